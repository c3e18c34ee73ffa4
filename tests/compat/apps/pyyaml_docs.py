import yaml

doc = {"name": "compat", "servers": [{"host": "a", "port": 1}, {"host": "b", "port": 2}], "nested": {"x": [1, 2, 3]}}
text = yaml.safe_dump(doc, sort_keys=True)
with open("config.yaml", "w") as f:
    f.write(text)
with open("config.yaml") as f:
    back = yaml.safe_load(f)
print("roundtrip", back == doc, len(list(yaml.safe_load_all("a: 1\n---\nb: 2\n"))))
