"""``read_checkpoint``: a checkpoint file's content, with no code from the file run, and errors
that name the file when it is unsafe, empty or cut short."""

import os
import pickle

import torch

__all__ = ["CheckpointError", "CorruptCheckpointError", "UnsafeCheckpointError", "read_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded; the message names the file."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is empty, truncated or not a checkpoint at all."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint file holds objects other than tensors, arrays and plain containers: loading
    it could run code from it, so it is refused before anything in it runs."""


# The advice that ends a CorruptCheckpointError's message (a resumed run replaces it).
WRITE_AGAIN = "Write, copy or download it again."
_CUT_SHORT = (
    "It is probably cut short (a crash or a full disk while it was written, or an interrupted "
    f"copy or download). {WRITE_AGAIN}"
)
_UNSAFE = (
    "Loading it could run code from it, so nothing in it was loaded or run. If you trust where "
    "it comes from, load it with {how} in a separate process and save only its tensors or "
    "arrays again."
)


def read_checkpoint(path):
    """The object in checkpoint file ``path``, running no code from it: ``torch.load`` with
    ``weights_only=True``, or for a ``.pkl`` (detectron2/Caffe2 format) a pickle restricted to
    NumPy arrays and plain containers. ``UnsafeCheckpointError`` if the file holds anything else,
    ``CorruptCheckpointError`` if it is empty or cannot be read; both name the file."""
    path = os.fspath(path)
    with open(path, "rb") as f:  # a missing or unreadable file fails here, as itself
        if os.fstat(f.fileno()).st_size == 0:
            raise CorruptCheckpointError(f"{path}: empty file (0 bytes). {_CUT_SHORT}")
        if path.endswith(".pkl"):
            return _read_pickle(f, path)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{path}: refused: it is not made only of tensors and plain containers, or not "
                f"a PyTorch checkpoint at all ({_weights_only_reason(e)}). "
                + _UNSAFE.format(how="torch.load(..., weights_only=False)")
            ) from None
        except MemoryError:
            raise
        except Exception as e:  # a zip archive or pickle cut short: RuntimeError, EOFError...
            raise CorruptCheckpointError(
                f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                f"{_first_line(e)}). {_CUT_SHORT}"
            ) from e


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts of NumPy arrays (detectron2/Caffe2 .pkl files) and nothing else."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # bytes in protocol 2 from Python 3
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(pickle.UnpicklingError):
    """A global that ``_ArraysOnly`` does not build."""


def _read_pickle(f, path):
    try:
        return _ArraysOnly(f, encoding="latin1").load()
    except _Refused as e:
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it would call {e}, and a detectron2/Caffe2 .pkl "
            "checkpoint holds only NumPy arrays and plain containers. "
            + _UNSAFE.format(how="pickle.load")
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # a pickle cut short or not a pickle: EOFError, ValueError...
        raise CorruptCheckpointError(
            f"{path}: cannot be read as a pickle ({type(e).__name__}: {e}). {_CUT_SHORT}"
        ) from e


def _first_line(error):
    """The first sentence of ``error``'s message (torch's go on with generic advice)."""
    return str(error).strip().split("\n")[0].split(". ")[0].rstrip(".")


def _weights_only_reason(error):
    """What torch's weights-only unpickler objected to, without its advice to turn it off."""
    message = str(error)
    marker = "WeightsUnpickler error:"
    if marker not in message:
        return _first_line(error)
    reason = message.split(marker, 1)[1].split("Check the documentation")[0].strip()
    return reason.split(". Please use")[0].split("\n")[0].strip() or _first_line(error)
