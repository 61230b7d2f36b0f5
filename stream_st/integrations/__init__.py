"""Helpers that plug stream_st into other libraries (imported only when used)."""
