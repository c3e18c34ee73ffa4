import pandas as pd

df = pd.DataFrame({"id": range(100), "value": [i * 0.5 for i in range(100)], "label": [f"x{i % 7}" for i in range(100)]})
df.to_csv("data.csv", index=False)
df.to_json("data.json", orient="records")
back = pd.read_csv("data.csv")
back2 = pd.read_json("data.json", orient="records")
print("csv", back.equals(df), "json", len(back2), back.groupby("label")["value"].count().max())
