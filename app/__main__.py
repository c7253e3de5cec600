from app.cli import api

api()
