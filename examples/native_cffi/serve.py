"""Serves the cffi-built handler: python build_handler.py && python serve.py"""

import pollpool
from _shout import ffi, lib

handler = pollpool.NativeHandler.from_pointer(ffi.addressof(lib, "shout"))
pollpool.Server(handler, port=9000, threads=4).serve_forever()
