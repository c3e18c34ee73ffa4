import subprocess
import sys

out = subprocess.run([sys.executable, "-c", "print('child')"], capture_output=True, text=True, check=True)
print("subprocess", out.stdout.strip())
