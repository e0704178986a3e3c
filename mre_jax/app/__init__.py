"""The web editing page (serve.py) and its screenshot helper (serve_screenshot.py)."""
