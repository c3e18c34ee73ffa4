# The site on PostgreSQL: the connection comes from database.json next to manage.py (written by whoever deploys it).
import json

from .settings import *  # noqa: F403
from .settings import BASE_DIR

DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", **json.loads((BASE_DIR / "database.json").read_text())}}
