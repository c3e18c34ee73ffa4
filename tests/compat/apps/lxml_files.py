import os

from lxml import etree

root = etree.Element("catalog", version="2")
for i in range(400):
    etree.SubElement(root, "item", id=str(i)).text = f"entry {i}"
tree = etree.ElementTree(root)
tree.write("catalog.xml", xml_declaration=True, encoding="utf-8", pretty_print=True)
tree.write("catalog.xml.gz", compression=6)

parsed = etree.parse("catalog.xml")
gz = etree.parse("catalog.xml.gz")
ids = [el.get("id") for _, el in etree.iterparse("catalog.xml", tag="item")]
print(
    "lxml",
    parsed.docinfo.encoding,
    len(parsed.getroot()),
    parsed.getroot()[399].text,
    len(gz.getroot()),
    len(ids),
    parsed.xpath("count(//item[starts-with(., 'entry 1')])"),
    os.path.getsize("catalog.xml") > os.path.getsize("catalog.xml.gz"),
)
