"""The corpus sources `balcony corpus --source NAME` grows a corpus from, one module each."""

from __future__ import annotations

from . import bible, books, chat, info, man, pydocs, reading

SOURCES = {module.SOURCE.name: module.SOURCE for module in (man, info, books, bible, chat, reading, pydocs)}
