"""What the rest of the stack uses to emit the schema (DESIGN.md section 2).

* `forwarder.producers.logging`: the JSON formatter and one-call logging setup for the
  API and the worker.
* ``ui-logger.js``: the browser snippet for the admin panel; the daemon serves it at
  /ui-logger.js (`ui_logger_js` gives its bytes).
"""

from __future__ import annotations

from importlib import resources

__all__ = ["UI_LOGGER_JS", "ui_logger_js"]

UI_LOGGER_JS = "ui-logger.js"


def ui_logger_js() -> bytes:
    """The browser snippet's source, read from the installed package (wheel or checkout)."""
    return resources.files(__name__).joinpath(UI_LOGGER_JS).read_bytes()
