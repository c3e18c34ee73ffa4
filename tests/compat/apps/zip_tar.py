import io
import tarfile
import zipfile
from pathlib import Path

src = Path("src")
src.mkdir()
for i in range(5):
    (src / f"f{i}.txt").write_text(f"file {i}\n" * 100)
with zipfile.ZipFile("out.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
    for p in sorted(src.iterdir()):
        z.write(p)
with tarfile.open("out.tar.gz", "w:gz") as t:
    t.add("src")
with zipfile.ZipFile("out.zip") as z:
    names = z.namelist()
    z.extractall("unzipped")
with tarfile.open("out.tar.gz") as t:
    t.extractall("untarred", filter="data")
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    z.writestr("mem.txt", "in memory")
print("zip", len(names), "tar", len(list(Path("untarred/src").iterdir())), Path("unzipped/src/f3.txt").read_text() == (src / "f3.txt").read_text())
