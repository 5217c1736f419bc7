"""Tests in a real headless Chromium (Debian's chromium package; see .ci/install-browser)."""
