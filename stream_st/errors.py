"""The exception tree of stream_st.

Every error derives from :class:`StreamSTError` and also from the builtin a caller would already catch.
``StreamSTError`` itself derives from ``safetensors.SafetensorError``, so code written for safetensors
(``except SafetensorError``) catches stream_st's errors too::

    StreamSTError
    ├── ConfigError(ValueError)                 an option has an impossible value
    ├── HeaderError(ValueError)                 the safetensors header breaks a format rule
    ├── TensorNotFoundError(KeyError)           a requested tensor is not in the file
    ├── UnsupportedDtypeError(TypeError)        the format allows the dtype, torch cannot hold it
    ├── IntegrityError(ValueError)              streamed bytes do not match the published digest
    ├── HandleClosedError(RuntimeError)         a safe_open handle was used after it was closed
    ├── CredentialsError(PermissionError)       no credentials were found for a store that needs them
    ├── ModelLoadError(RuntimeError)            load_model could not give the model a complete, consistent state
    └── FetchError(OSError)                     bytes could not be fetched as asked
        ├── RangeNotSupportedError              the server ignored or mangled a Range request
        ├── IncompleteReadError                 a body ended before the bytes asked for arrived
        ├── SlowTransferError(TimeoutError)     a server sent slower than ``min_speed`` (retried)
        ├── ObjectChangedError                  the object changed while it was being loaded
        └── NotCachedError(FileNotFoundError)   offline, and the bytes asked for are not in the cache

``FileNotFoundError`` and ``PermissionError`` raised by the storage layer pass through unchanged
(with the URL in their message). Errors carry ``url``, ``tensor``, ``start`` and ``end`` where known; a
``url`` (like every message) is the display form of a location: no user info, no query string.
"""

from __future__ import annotations

from safetensors import SafetensorError

from .location import redact, redact_text


class StreamSTError(SafetensorError):
    """Base class of every error raised by stream_st."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        tensor: str | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> None:
        super().__init__(message)
        self.url = redact(url) if url else url  # callers pass display forms; this makes sure
        self.tensor = tensor
        self.start = start
        self.end = end

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(StreamSTError, ValueError):
    """An option has a value that cannot work."""


class HeaderError(StreamSTError, ValueError):
    """The safetensors header is malformed, inconsistent, or disagrees with the object's size."""


class TensorNotFoundError(StreamSTError, KeyError):
    """A requested tensor name or pattern matches nothing in the file."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedDtypeError(StreamSTError, TypeError):
    """The file uses a dtype that torch cannot represent."""


class IntegrityError(StreamSTError, ValueError):
    """The streamed bytes do not match the digest they were checked against (or none could be checked)."""


class HandleClosedError(StreamSTError, RuntimeError):
    """A ``safe_open`` handle was used after it was closed (safetensors raises its ``SafetensorError``)."""


class CredentialsError(StreamSTError, PermissionError):
    """The store needs credentials and none were found (botocore's NoCredentialsError, google-auth's
    DefaultCredentialsError, ...), or those found cannot be used."""


class ModelLoadError(StreamSTError, RuntimeError):
    """``load_model``: names missing or unexpected (``strict``), tied names stored with different values, or a
    parameter or buffer left on the ``meta`` device."""


class FetchError(StreamSTError, OSError):
    """Bytes could not be fetched from the source as asked."""


class RangeNotSupportedError(FetchError):
    """The server ignored a Range request, or answered with the wrong range."""


class IncompleteReadError(FetchError):
    """The response body ended before all requested bytes arrived."""


class SlowTransferError(FetchError, TimeoutError):
    """A server delivered fewer bytes than the ``min_speed`` rule asks for; the request is retried."""


class ObjectChangedError(FetchError):
    """The object was replaced while it was being loaded (its ETag or version changed)."""


class RangeIgnoredWarning(UserWarning):
    """The server ignores Range requests: a load streams the object from its first byte and drops what it
    does not want (it still works, but a partial load costs the whole download)."""


class NotCachedError(FetchError, FileNotFoundError):
    """Offline (``STREAM_ST_OFFLINE``, ``HF_HUB_OFFLINE`` for hf://) and the object, or the tensors asked
    for, are not in the local cache (``cache_dir``) nor, for hf://, in huggingface_hub's cache."""


class IntegrityWarning(UserWarning):
    """A load asked to be verified could not be (a partial load without per-tensor digests)."""


# Exceptions of the credential stacks under fsspec (botocore, google-auth, azure-identity, huggingface_hub)
# that mean "no usable credentials", by class name, so that none of those packages is imported to check.
_CREDENTIAL_FAILURES = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "NoAuthTokenError",
        "DefaultCredentialsError",
        "RefreshError",
        "CredentialUnavailableError",
        "ClientAuthenticationError",
    }
)


def credentials_error(exc: BaseException, url: str) -> CredentialsError | None:
    """``exc`` as a CredentialsError naming ``url`` (a display form) if a credential stack raised it."""
    if type(exc).__name__ not in _CREDENTIAL_FAILURES:
        return None
    return CredentialsError(
        f"{url}: no usable credentials ({type(exc).__name__}: {redact_text(str(exc), 200)}); pass them in "
        "storage_options, the store's environment variables or its config files (see the README's 'Where from')",
        url=url,
    )
