import numpy as np
import pandas as pd

df = pd.DataFrame({"city": ["a", "b", "a", "c", "b", "a"], "sales": [1, 2, 3, 4, 5, 6]})
df["when"] = pd.date_range("2024-01-01", periods=len(df), freq="D")
totals = df.groupby("city")["sales"].sum()
rolled = df.set_index("when")["sales"].rolling(2).mean()
print(totals.to_dict(), float(np.nansum(rolled)))
