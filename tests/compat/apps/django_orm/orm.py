"""Django's ORM on SQLite without a project: settings in code, one app with a migration."""

import django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "notes"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "orm.sqlite3"}},
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    USE_TZ=True,
)
django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from django.db.models import Count, Sum  # noqa: E402

from notes.models import Author, Note  # noqa: E402

call_command("migrate", verbosity=0)
ada, bob = Author.objects.create(name="ada"), Author.objects.create(name="bob")
Note.objects.bulk_create([Note(author=ada if i % 2 else bob, text=f"note {i}") for i in range(60)])
Note.objects.filter(author=ada).update(stars=3)
Note.objects.filter(id__gt=50).delete()
try:
    with transaction.atomic():
        Note.objects.all().update(stars=100)
        raise RuntimeError("roll back")
except RuntimeError:
    pass
per = sorted(Author.objects.annotate(n=Count("notes")).values_list("name", "n"))
print("orm", Note.objects.count(), per, Note.objects.aggregate(s=Sum("stars"))["s"])
