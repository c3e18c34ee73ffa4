"""What the start-up benchmark times inside the process: one big import (argv[1]), in ms.

``empty`` imports nothing; ``flask`` is ``import flask``; ``django`` is ``django.setup()``
with the contrib apps of a new project (admin, auth, contenttypes, sessions, messages).
"""

import sys
import time

t = time.perf_counter()
what = sys.argv[1]
if what == "flask":
    import flask  # noqa: F401
elif what == "django":
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
        ]
    )
    django.setup()
elif what != "empty":
    raise SystemExit(f"unknown import {what!r}")
print(f"{(time.perf_counter() - t) * 1000:.2f}")
