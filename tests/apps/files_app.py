import json
import os
import pathlib
import shutil
import tempfile

d = tempfile.mkdtemp(prefix="enc")
p = pathlib.Path(d) / "sub" / "a.txt"
p.parent.mkdir(parents=True)
p.write_text("héllo\nworld\n")
print(p.read_text().splitlines())
with open(p, "a") as f:
    f.write("more\n")
with open(p, "rb+") as f:
    f.seek(1)
    f.write(b"E")
    f.seek(0)
    print(f.read())
shutil.copy(p, p.with_suffix(".bak"))
print(sorted(os.listdir(p.parent)), [e.name for e in os.scandir(p.parent)].__len__())
for root, dirs, files in os.walk(d):
    print(os.path.relpath(root, d), sorted(files))
os.rename(p, p.with_name("b.txt"))
print(os.path.exists(p), os.path.getsize(p.with_name("b.txt")))
fd = os.open(os.path.join(d, "raw"), os.O_CREAT | os.O_RDWR, 0o600)
os.write(fd, b"0123456789")
print(os.pread(fd, 4, 3))
os.ftruncate(fd, 5)
print(os.fstat(fd).st_size)
os.close(fd)
with tempfile.TemporaryFile() as t:
    t.write(b"xyz")
    t.seek(0)
    print(t.read())
json.dump({"a": 1}, open(os.path.join(d, "j.json"), "w"))
print(json.load(open(os.path.join(d, "j.json"))))
try:
    open(os.path.join(d, "nope"))
except FileNotFoundError as e:
    print("FNF ok", e.errno)
try:
    os.read(12345, 1)
except OSError as e:
    print("EBADF", e.errno)
shutil.rmtree(d)
print("exists after rmtree:", os.path.exists(d))
print(os.getcwd() == os.path.abspath("."))
