from app.admin.cli import api

api()
