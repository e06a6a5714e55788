"""Placeholder: the realtime helper replaces this file (SSE stream)."""

from fastapi import APIRouter

router = APIRouter()
