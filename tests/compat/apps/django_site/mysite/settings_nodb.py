# The site without a database (its SQLite part waits for the C-library issue): sessions live in signed cookies.
from .settings import *  # noqa: F403

DATABASES = {}
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
