from jinja2 import Environment, FileSystemLoader, select_autoescape

env = Environment(loader=FileSystemLoader("templates"), autoescape=select_autoescape())
html = env.get_template("page.html").render(title="Fruit", items=["apple", "pear"], unsafe="<script>")
print(" ".join(html.split()))
