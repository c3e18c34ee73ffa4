import numpy as np

rng = np.random.default_rng(7)
a = rng.standard_normal((200, 200))
inv = np.linalg.inv(a @ a.T + np.eye(200))
fft = np.fft.rfft(np.sin(np.linspace(0, 8 * np.pi, 1024)))
print("identity", np.allclose(inv @ (a @ a.T + np.eye(200)), np.eye(200)), "peak", int(np.argmax(np.abs(fft))))
