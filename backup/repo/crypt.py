"""Client-side encryption of a repository (design §3.7, ``FORMAT.md`` "Encryption").

One 256-bit master key, kept in a key file outside the repository. From it and the repository's
random salt, HKDF-SHA-256 derives three keys: one names chunks (HMAC-SHA-256 of the plaintext, so
equal data still deduplicates within the repository while a name says nothing about the data), one
encrypts chunks and manifests (AES-256-GCM, a random 96-bit nonce per object, the object's name as
associated data so an object moved under another name fails to decrypt), and one makes the key check
value the config records (a wrong key is a clear error before anything is read).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import RepoError

KEY_BYTES = 32
NONCE_BYTES = 12
CIPHER = "AES-256-GCM"
CHUNK_ID = "HMAC-SHA-256"
KDF = "HKDF-SHA-256"
_CHECK_MESSAGE = b"nbd-backup repository key check"


class DecryptError(RepoError):
    """An object's GCM tag does not match: wrong key, or the stored bytes changed."""

    default_errno = errno.EIO


def load_key_file(path: str | os.PathLike[str], *, create: bool = False) -> bytes:
    """The 256-bit key in ``path`` (64 hex digits); with ``create`` a missing file is made (0600, random key)."""
    file = Path(path)
    if create:
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        except OSError as e:
            raise RepoError(f"cannot create key file {file}: {e.strerror}", e.errno) from None
        else:
            key = os.urandom(KEY_BYTES)
            with os.fdopen(fd, "w") as f:
                f.write(key.hex() + "\n")
                f.flush()
                os.fsync(f.fileno())
            return key
    try:
        text = file.read_text().strip()
    except FileNotFoundError:
        raise RepoError(f"key file {file} does not exist", errno.ENOENT) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RepoError(f"cannot read key file {file}: {getattr(e, 'strerror', None) or e}", errno.EACCES) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise RepoError(f"key file {file} does not hold a 256-bit key (64 hex digits)")
    return key


class RepoCipher:
    """The keys of one encrypted repository; thread-safe (AESGCM and hmac objects are not shared state)."""

    def __init__(self, master: bytes, salt: bytes) -> None:
        if len(master) != KEY_BYTES:
            raise RepoError("a repository key has 256 bits")
        self.salt = salt
        self._id_key = _derive(master, salt, b"nbd-backup chunk-id")
        self._aead = AESGCM(_derive(master, salt, b"nbd-backup encrypt"))
        self.check_value = hmac.new(
            _derive(master, salt, b"nbd-backup key-check"), _CHECK_MESSAGE, "sha256"
        ).hexdigest()

    @classmethod
    def new(cls, master: bytes) -> RepoCipher:
        return cls(master, os.urandom(16))

    def config(self) -> dict[str, Any]:
        """What the repository config records: the algorithms, the salt and the key check value."""
        return {
            "cipher": CIPHER,
            "chunk-id": CHUNK_ID,
            "kdf": KDF,
            "salt": self.salt.hex(),
            "key-check": self.check_value,
        }

    @classmethod
    def open(cls, master: bytes, doc: Any, where: str) -> RepoCipher:
        """The cipher a config describes; a wrong key is a one-line error."""
        if not isinstance(doc, dict) or (doc.get("cipher"), doc.get("chunk-id"), doc.get("kdf")) != (
            CIPHER,
            CHUNK_ID,
            KDF,
        ):
            raise RepoError(f"{where}: unsupported encryption {doc!r}")
        try:
            salt = bytes.fromhex(str(doc["salt"]))
        except (KeyError, ValueError):
            raise RepoError(f"{where}: invalid encryption salt") from None
        cipher = cls(master, salt)
        if not hmac.compare_digest(cipher.check_value, str(doc.get("key-check", ""))):
            raise RepoError(f"{where}: wrong key (the key file does not match this repository)", errno.EACCES)
        return cipher

    # -- chunk ids

    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        return hmac.new(self._id_key, data, hashlib.sha256).hexdigest()

    def zero_id(self, length: int) -> str:
        return _zero_id(self._id_key, length)

    # -- object bodies

    def seal(self, plain: bytes, name: str) -> bytes:
        """nonce ‖ AES-256-GCM(plain) with ``name`` as associated data."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plain, name.encode())

    def open_sealed(self, blob: bytes, name: str) -> bytes:
        if len(blob) < NONCE_BYTES + 16:
            raise DecryptError(f"{name}: too short to be encrypted")
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], name.encode())
        except InvalidTag:
            raise DecryptError(f"{name}: authentication failed (GCM tag)") from None


def _derive(master: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(master)


@lru_cache(maxsize=16)
def _zero_id(id_key: bytes, length: int) -> str:
    return hmac.new(id_key, bytes(length), hashlib.sha256).hexdigest()
