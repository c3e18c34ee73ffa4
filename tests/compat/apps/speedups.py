# Packages that ship optional C speed-ups and fall back to pure Python without a word when they cannot load.
import sys

import aiohttp.http_parser
import markupsafe  # noqa: F401
import multidict

print("markupsafe", "markupsafe._speedups" in sys.modules,
      "multidict", not multidict.MultiDict.__module__.endswith("_multidict_py"),
      "aiohttp-parser", aiohttp.http_parser.HttpRequestParser is not aiohttp.http_parser.HttpRequestParserPy)
