from datetime import date

from pydantic import BaseModel, Field, ValidationError


class User(BaseModel):
    id: int
    name: str = Field(min_length=1)
    born: date
    tags: list[str] = []


u = User.model_validate({"id": "42", "name": "Ada", "born": "1815-12-10", "tags": ["math"]})
try:
    User(id="x", name="", born="never")
except ValidationError as e:
    errors = e.error_count()
print(u.id, u.born.year, u.model_dump_json(), "errors:", errors)
