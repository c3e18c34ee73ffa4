from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=80, unique=True)


class Note(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="notes")
    text = models.TextField()
    stars = models.IntegerField(default=0)
