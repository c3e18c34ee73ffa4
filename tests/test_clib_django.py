"""Django's ORM on SQLite in an encrypted FS-shield region (issue 11): a real project with an app,
its migration, models and transactions, through the libc layer; then a host that puts an older
copy of the database back between two runs.

Settings are made in code (``settings.configure``), as an app that embeds Django does; the
app's package and its migration are ordinary files on the unprotected root region.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_native
from test_fs_shield import FS

SECRET = "django-row-the-host-must-never-read"

# The Django app: the compatibility matrix's (its models and its migration).
NOTES = Path(__file__).parent / "compat" / "apps" / "django_orm" / "notes"

# One step of the project's life per run.  Whatever Django says about a bad database is printed
# as its class: wrong rows cannot hide behind it.
APP = f"""
import sys

import django
from django.conf import settings

db, step = sys.argv[1], sys.argv[2]
settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "notes"],
    DATABASES={{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": db}}}},
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    USE_TZ=True,
)
django.setup()

from django.core.management import call_command
from django.db import DatabaseError, transaction
from django.db.models import Count, Sum

from notes.models import Author, Note


def show():
    rows = list(Note.objects.order_by("id").values_list("author__name", "text", "stars"))
    per = dict(Author.objects.annotate(n=Count("notes")).values_list("name", "n"))
    print("notes", len(rows), rows[0] if rows else None, rows[-1] if rows else None)
    print("per-author", sorted(per.items()), "stars", Note.objects.aggregate(s=Sum("stars"))["s"])


try:
    if step == "migrate":
        call_command("migrate", verbosity=1)
    elif step == "create":
        ada, bob = Author.objects.create(name="ada"), Author.objects.create(name="bob")
        Note.objects.bulk_create([Note(author=ada if i % 2 else bob, text="{SECRET} %d" % i) for i in range(60)])
        Note.objects.filter(author=ada).update(stars=3)
        Note.objects.filter(text__endswith=" 7").update(text="edited")
        Note.objects.filter(id__gt=50).delete()
        try:
            with transaction.atomic():
                Note.objects.all().update(stars=100)
                Author.objects.create(name="eve")
                raise RuntimeError("abort this transaction")
        except RuntimeError as e:
            print("rolled back:", e)
    elif step == "add":
        with transaction.atomic():
            Note.objects.create(author=Author.objects.get(name="bob"), text="{SECRET} added")
    show()
except DatabaseError as e:
    print("refused", type(e).__name__, e)
"""


@pytest.fixture
def fs(tmp_path: Path) -> FS:
    fs = FS(tmp_path)
    shutil.copytree(NOTES, tmp_path / "notes", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "orm_app.py").write_text(APP)
    return fs


EXPECTED_AFTER_CREATE = [
    "rolled back: abort this transaction",
    f"notes 50 ('bob', '{SECRET} 0', 0) ('ada', '{SECRET} 49', 3)",
    "per-author [('ada', 25), ('bob', 25)] stars 75",
]


def _steps(fs: FS, db: str) -> list[str]:
    out = []
    for step in ("migrate", "create"):
        r = fs.run(fs.root / "orm_app.py", db, step, extra=("--env", f"SQLITE_TMPDIR={fs.enc}"))
        assert r.returncode == 0, (step, r.stdout, r.stderr)
        out += r.stdout.splitlines()
    return out


def test_djangos_orm_on_sqlite_in_an_encrypted_region_is_as_native_and_sealed(fs: FS) -> None:
    pytest.importorskip("django")
    native = []
    for step in ("migrate", "create"):
        r = run_native(fs.root / "orm_app.py", str(fs.root / "native.db"), step, cwd=fs.root)
        assert r.returncode == 0, r.stderr
        native += r.stdout.splitlines()
    assert native[-3:] == EXPECTED_AFTER_CREATE, native
    assert "  Applying notes.0001_initial... OK" in native
    db = fs.enc / "app.db"
    assert _steps(fs, str(db)) == native
    host_files = [p for p in fs.enc.iterdir() if p.is_file()]
    assert db in host_files
    for p in host_files:
        data = p.read_bytes()
        assert SECRET.encode() not in data and b"SQLite format 3" not in data and b"notes_note" not in data, p


def test_an_older_copy_of_the_database_put_back_by_the_host_is_refused(fs: FS) -> None:
    pytest.importorskip("django")
    db = fs.enc / "app.db"
    _steps(fs, str(db))
    old_db, old_fspf = db.read_bytes(), fs.fspf.read_bytes()
    r = fs.run(fs.root / "orm_app.py", str(db), "add")
    assert r.stdout.splitlines()[0] == f"notes 51 ('bob', '{SECRET} 0', 0) ('bob', '{SECRET} added', 0)", r.stderr
    # The host puts back the database as it was before the last run's commit.
    db.write_bytes(old_db)
    r = fs.run(fs.root / "orm_app.py", str(db), "show")
    out = r.stdout.splitlines()
    assert not any(line.startswith(("notes", "per-author")) for line in out), (r.stdout, r.stderr)
    assert out and out[-1].startswith("refused ") and "Error" in out[-1], (r.stdout, r.stderr)
    assert "pyscone: fs shield:" in r.stderr and "refused" in r.stderr, r.stderr
    # And the database with the FSPF that described it, consistently: only the pin knows.
    fs.put_back_fspf(old_fspf)
    r = fs.run(fs.root / "orm_app.py", str(db), "show")
    assert r.returncode == 70 and "notes" not in r.stdout, (r.stdout, r.stderr)
    assert "cannot mount the file-system shield" in r.stderr and "not the pinned version" in r.stderr
