import numpy as np

a = np.arange(1000, dtype=np.float64).reshape(10, 100)
np.save("a.npy", a)
np.savez_compressed("both.npz", a=a, b=a * 2)
b = np.load("a.npy")
z = np.load("both.npz")
np.savetxt("a.txt", a[:2])
t = np.loadtxt("a.txt")
print("equal", np.array_equal(a, b), np.array_equal(z["b"], a * 2), t.shape)
