"""The cffi declarations in pollpool/_build.py are a copy of the C headers:
this checks every copied prototype, struct and constant against csrc/, so a
header change that the copy misses fails here rather than as memory read
through a wrong layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(30)


def _cdef() -> str:
    import importlib.util
    spec = importlib.util.spec_from_file_location("pp_build_for_test", ROOT / "pollpool" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CDEF


def _headers() -> str:
    text = "".join((ROOT / "csrc" / name).read_text() for name in ("pollpool.h", "pp_server.h"))
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)   # comments
    return re.sub(r"//[^\n]*", " ", text)


def _norm(decl: str) -> str:
    return re.sub(r"\s+", " ", decl).replace("( ", "(").replace(" )", ")").strip()


def _prototypes(text: str) -> dict:
    """name -> normalized prototype, for the core's public functions."""
    out = {}
    for m in re.finditer(r"(?:^|[;}\n])\s*((?:const\s+)?[A-Za-z_][\w \*]*?\b(pp_\w+)\s*\([^;{]*\))\s*;",
                         text):
        decl, name = m.group(1), m.group(2)
        if name.startswith("pp_py_") or decl.lstrip().startswith(("typedef", "return")):
            continue
        out[name] = _norm(decl)
    return out


def _fields(text: str, struct: str) -> list:
    m = re.search(r"typedef struct %s \{(.*?)\} %s;" % (struct, struct), text, re.S)
    assert m, struct
    body = re.sub(r"\([^)]*\)\s*\([^)]*\)", "", m.group(1))  # function pointer params
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl:
            continue
        fp = re.search(r"\(\s*\*\s*(\w+)\s*\)", decl)
        if fp:
            names.append(fp.group(1))
            continue
        for part in decl.split(","):
            names.append(re.sub(r"\[.*\]", "", part).split()[-1].lstrip("*"))
    return names


#: Declared with char * where the header has void *, on purpose: cffi then
#: takes a Python bytes object for it without a copy.  Same ABI.
CHAR_FOR_VOID = {"pp_reply_send_framed"}


def test_every_core_prototype_in_the_cdef_matches_the_header():
    cdef, hdr = _prototypes(_cdef()), _prototypes(_headers())
    assert len(cdef) >= 20, sorted(cdef)
    for name, decl in cdef.items():
        assert name in hdr, f"{name} is declared for cffi but not in csrc/pp_server.h"
        want = hdr[name]
        if name in CHAR_FOR_VOID:
            want = want.replace("const void *", "const char *")
        assert decl == want, f"{name}:\n  cdef:   {decl}\n  header: {hdr[name]}"


@pytest.mark.parametrize("struct", ["pp_config", "pp_stats"])
def test_structs_in_the_cdef_have_the_headers_fields_in_order(struct):
    assert _fields(_cdef(), struct) == _fields(_headers(), struct)


def test_constants_in_the_cdef_have_the_headers_values():
    hdr = _headers()
    values = {m.group(1): int(m.group(2)) for m in
              re.finditer(r"#define\s+(\w+)\s+(\d+)\b", hdr)}
    for enum in re.finditer(r"enum\s*\{([^}]*)\}", hdr):
        for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", enum.group(1)):
            values[name] = int(value)
    consts = re.findall(r"#define\s+(\w+)\s+(\d+)", _cdef())
    assert len(consts) >= 10
    for name, value in consts:
        assert values.get(name) == int(value), (name, value, values.get(name))
