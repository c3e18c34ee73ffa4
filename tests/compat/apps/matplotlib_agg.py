import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([0, 1, 2, 3], [1, 4, 9, 16], marker="o", label="squares")
ax.set_title("compat")
ax.legend()
fig.savefig("plot.png", dpi=80)
with open("plot.png", "rb") as f:
    head = f.read(8)
print("png", head == b"\x89PNG\r\n\x1a\n")
