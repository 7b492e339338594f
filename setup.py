"""Only what pyproject.toml cannot say: the cffi extension, and shipping
csrc/pollpool.h inside the package so that get_include() finds it."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithHeader(build_py):
    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "pollpool", "include")
        os.makedirs(dest, exist_ok=True)
        shutil.copy(os.path.join("csrc", "pollpool.h"), dest)


setup(
    cffi_modules=["pollpool/_build.py:ffi"],
    cmdclass={"build_py": BuildPyWithHeader},
)
