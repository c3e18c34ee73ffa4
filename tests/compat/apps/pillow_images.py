from PIL import Image, ImageDraw, ImageFilter

im = Image.new("RGB", (120, 80), "white")
draw = ImageDraw.Draw(im)
draw.rectangle((10, 10, 60, 60), fill=(200, 30, 30))
im.filter(ImageFilter.GaussianBlur(2)).save("out.png")
im.save("out.jpg", quality=85)
with Image.open("out.png") as png, Image.open("out.jpg") as jpg:
    print(png.format, png.size, jpg.format, png.getpixel((35, 35)))
