"""The web dashboard (`conduit dashboard`): server-rendered pages on Starlette, Jinja2 and uvicorn.

Installed with the `dashboard` extra. app.py has the pages and actions, security.py who may see
them, charts.py and preview.py what they draw, templates/ and static/ the markup and the few
lines of script that refresh it.
"""
