import os
import shutil
from pathlib import Path

tree = Path("tree")
(tree / "a" / "b").mkdir(parents=True)
(tree / "a" / "one.txt").write_text("one")
(tree / "a" / "b" / "two.txt").write_text("two")
os.chmod(tree / "a" / "one.txt", 0o640)
shutil.copy2(tree / "a" / "one.txt", "copy.txt")
shutil.copytree(tree, "tree2")
shutil.move("tree2", "tree3")
archive = shutil.make_archive("backup", "gztar", root_dir="tree")
shutil.unpack_archive(archive, "restored")
shutil.rmtree("tree3")
usage = shutil.disk_usage(".")
print("copy2 mode", oct(os.stat("copy.txt").st_mode & 0o777), "restored", (Path("restored") / "a" / "b" / "two.txt").read_text(),
      "tree3 gone", not Path("tree3").exists(), "disk", usage.total > 0)
