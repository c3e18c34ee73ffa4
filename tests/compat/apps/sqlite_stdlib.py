import sqlite3

con = sqlite3.connect("app.db")
con.execute("create table t (k text primary key, v integer)")
con.executemany("insert into t values (?, ?)", [("a", 1), ("b", 2)])
con.commit()
print("sqlite", con.execute("select sum(v) from t").fetchone()[0])
