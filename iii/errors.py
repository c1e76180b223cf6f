"""The engine's error hierarchy: one class per failure a caller can see.

Each :class:`IIIError` carries the wire ``code`` that ends up in an
``ErrorBody`` sent to the caller.  Errors that end a WebSocket connection
carry the close code as well.  Nothing here does I/O.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "IIIError",
    "FunctionNotFoundError",
    "InvocationFailedError",
    "InvocationStoppedError",
    "InvocationTimeoutError",
    "DeserializationError",
    "FrameTooLargeError",
    "AdapterUnavailableError",
    "TriggerRegistrationError",
    "ConfigError",
    "BindError",
    "MessageDecodeError",
]


class IIIError(Exception):
    """An error with a stable wire code, shown to callers as ``{code, message}``."""

    code = "invocation_error"

    def __init__(self, message: str, *, code: str | None = None, stacktrace: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.stacktrace = stacktrace

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.stacktrace:
            body["stacktrace"] = self.stacktrace
        return body


class FunctionNotFoundError(IIIError):
    code = "function_not_found"

    def __init__(self, function_id: str):
        super().__init__(f"Function {function_id} not found")
        self.function_id = function_id


class InvocationFailedError(IIIError):
    """The function ran and reported an error (code and message are the worker's own)."""

    code = "invocation_failed"


class InvocationStoppedError(IIIError):
    code = "invocation_stopped"

    def __init__(self, message: str = "Invocation stopped"):
        super().__init__(message)


class InvocationTimeoutError(IIIError):
    code = "timeout"


class FrameTooLargeError(IIIError):
    """A message too large for the worker it must go to (0.4.1 workers take 1 MiB)."""

    code = "payload_too_large"


class DeserializationError(IIIError):
    code = "deserialization_error"


class AdapterUnavailableError(IIIError):
    code = "adapter_unavailable"


class TriggerRegistrationError(IIIError):
    code = "trigger_registration_failed"


class ConfigError(Exception):
    """A configuration problem: names the file, the key and the reason."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        self.reason = message
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class BindError(OSError):
    """A listener could not bind its address.

    It names the listener, the address and the config keys that set it
    (``keys``: "config keys modules[1].config.host and modules[1].config.port");
    ``in_file`` is False when those keys are a default module's, not the
    file's.  :meth:`describe` adds the config file.  Still an :class:`OSError`
    with the cause's ``errno``, so the CLI's "cannot start" line and its exit
    code (1) stay as they were.
    """

    def __init__(
        self, what: str, host: str | None, port: int, keys: str, cause: OSError, *, in_file: bool
    ):
        self.what = what
        self.address = f"{host or '*'}:{port}"
        self.keys = keys
        self.in_file = in_file
        self.reason = cause.strerror or str(cause)
        super().__init__(cause.errno, f"{what} cannot listen on {self.address}: {self.reason}")

    def __str__(self) -> str:
        return f"{super().__str__()} ({self.keys})"

    def describe(self, file: str | None) -> str:
        """The one-line message, with the file the keys are in (or that they are defaults)."""
        if not self.in_file:
            return str(self)
        if file is None:
            return f"{super().__str__()} ({self.keys}: no config file, so their defaults)"
        return f"{super().__str__()} ({self.keys} in {file})"


class MessageDecodeError(Exception):
    """A frame from a worker that is not a valid protocol message.

    ``invocation_id`` / ``function_id`` / ``message_type`` are filled in when they
    could still be read, so the engine can answer a caller instead of leaving it
    waiting for its own timeout.
    """

    def __init__(
        self,
        reason: str,
        *,
        message_type: str | None = None,
        invocation_id: str | None = None,
        function_id: str | None = None,
    ):
        super().__init__(reason)
        self.reason = reason
        self.message_type = message_type
        self.invocation_id = invocation_id
        self.function_id = function_id
