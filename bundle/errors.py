"""Typed errors of the bundle format.

Every refusal names the file it is about and the reason, so an operator can act
on the message alone and the agent can report it to the fleet verbatim. The
tree, grouped by origin (what is wrong, not where it was noticed)::

    BundleError                      root; .path, .reason
    ├── BundleNotFound               no bundle directory / archive at the path
    ├── ManifestError                outpost.json itself
    │   ├── ManifestSchemaError      .field: JSON path of the offending field
    │   └── ManifestInconsistent     manifest and signature disagree
    ├── SignatureError               model.sig
    │   ├── SignatureMissing         case 6: no signature
    │   ├── SignatureMalformed       case 6: empty or garbled
    │   └── SignatureUntrusted       case 5: valid, but no trusted key made it
    ├── IntegrityError               the signed files on disk
    │   ├── FileModified             case 1, 7: content differs from its signed digest
    │   ├── ManifestModified         case 4: outpost.json edited after signing
    │   ├── FileSizeMismatch         case 2: truncated or extended
    │   ├── UnsignedFile             case 3: added after signing
    │   ├── MissingFile              case 3: removed after signing
    │   ├── UnreadableFile           the OS refused a read (permissions, I/O error, path too long)
    │   └── UnsafeFile               symlink, device, fifo inside the bundle
    ├── ArchiveError                 the packed single-file form
    │   ├── UnsafeArchiveMember      case 8: absolute, '..', links, devices
    │   └── ArchiveTooLarge          case 9: expands past the limit
    ├── ModelError                   the ONNX files
    │   ├── InvalidModel             not a valid ONNX model (onnx checker)
    │   └── ExternalDataError        case 10: external data outside the bundle
    └── SigningError                 keys and signing itself

The numbers are the rejection cases of the bundle specification (README).
"""

from __future__ import annotations


class BundleError(Exception):
    """Root of every bundle error."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class BundleNotFound(BundleError, FileNotFoundError):
    pass


class ManifestError(BundleError):
    pass


class ManifestSchemaError(ManifestError):
    def __init__(self, path: str, field: str, reason: str) -> None:
        self.field = field
        super().__init__(path, f"field {field}: {reason}")


class ManifestInconsistent(ManifestError):
    pass


class SignatureError(BundleError):
    pass


class SignatureMissing(SignatureError):
    pass


class SignatureMalformed(SignatureError):
    pass


class SignatureUntrusted(SignatureError):
    pass


class IntegrityError(BundleError):
    pass


class FileModified(IntegrityError):
    pass


class ManifestModified(IntegrityError):
    pass


class FileSizeMismatch(IntegrityError):
    pass


class UnsignedFile(IntegrityError):
    pass


class MissingFile(IntegrityError):
    pass


class UnreadableFile(IntegrityError):
    pass


class UnsafeFile(IntegrityError):
    pass


class ArchiveError(BundleError):
    pass


class UnsafeArchiveMember(ArchiveError):
    pass


class ArchiveTooLarge(ArchiveError):
    pass


class ModelError(BundleError):
    pass


class InvalidModel(ModelError):
    pass


class ExternalDataError(ModelError):
    pass


class SigningError(BundleError):
    pass
