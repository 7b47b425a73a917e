"""model.ort -> the same model.ort content, serialized in one canonical byte order.

Why: onnxruntime's ORT-format writer (``convert_onnx_models_to_ort``, or ``optimized_model_filepath``
with ``session.save_model_format = ORT``) writes different bytes for the same graph on every run.
The decoded content is identical (every table, vector, string and tensor compares equal, see
:func:`ort_content`); only the order in which the C++ flatbuffers builder laid out the objects in the
buffer differs. That order follows iteration over hash containers keyed by pointers and seeded per
process, so it moves with address-space layout randomization: with ASLR off (``setarch -R``) two
runs agree, but a different environment size or input path moves the heap and changes the bytes
again, so turning ASLR off is no fix.

The fix: decode the flatbuffer with onnxruntime's own generated Python bindings
(``onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs``) and build it again with the Python
``flatbuffers`` builder, children before parents, fields in name order, vectors in their stored
order, strings shared by content. Same content -> same traversal -> same bytes. The bindings are
walked by reflection (``Add<Field>`` builder functions paired with ``<Field>`` accessors), so a new
optional field in a later onnxruntime is carried over without a code change; the schema's one union
(``TypeInfo.value``) and one struct (``EdgeEnd``) are named below.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from types import ModuleType

FILE_IDENTIFIER = b"ORTM"


def _fbs():
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.MapType import MapType
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.SequenceType import SequenceType
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.TensorTypeAndShape import TensorTypeAndShape

    # TypeInfoValue: 1 tensor_type, 2 sequence_type, 3 map_type (onnxruntime/core/flatbuffers/schema/ort.fbs)
    unions = {("TypeInfo", "Value"): {1: TensorTypeAndShape, 2: SequenceType, 3: MapType}}
    return InferenceSession, unions


def _fields(module: ModuleType) -> list[str]:
    """Field names of a table, from its builder functions ``Add<Field>``, in name order."""
    return sorted(name[3:] for name, fn in inspect.getmembers(module, inspect.isfunction) if name.startswith("Add"))


def _is_struct(obj) -> bool:
    return hasattr(obj, "_tab") and not hasattr(type(obj), "GetRootAs")


def _module_of(obj) -> ModuleType:
    return sys.modules[type(obj).__module__]


class _Writer:
    def __init__(self, unions: dict):
        import flatbuffers

        self.builder = flatbuffers.Builder(1 << 20)
        self.unions = unions

    def table(self, obj) -> int:
        """Build ``obj`` (a decoded table) and everything under it; returns its offset."""
        module, cls = _module_of(obj), type(obj)
        b = self.builder
        values = []  # (field, value to Add): offsets of children first, scalars as they are
        for field in _fields(module):
            if not hasattr(cls, field):
                continue  # a deprecated slot with no accessor: onnxruntime no longer writes it
            if hasattr(cls, field + "Length"):
                if getattr(obj, field + "IsNone")():
                    continue
                values.append((field, self.vector(obj, module, field)))
                continue
            union = self.unions.get((cls.__name__, field))
            value = getattr(obj, field)()
            if value is None:
                continue
            if union is not None:
                member = union[getattr(obj, field + "Type")()]()
                member.Init(value.Bytes, value.Pos)
                value = self.table(member)
            elif isinstance(value, bytes):
                value = b.CreateSharedString(value)
            elif hasattr(value, "_tab"):
                value = self.table(value)
            values.append((field, value))
        module.Start(b)
        for field, value in values:
            getattr(module, "Add" + field)(b, value)
        return module.End(b)

    def vector(self, obj, module: ModuleType, field: str) -> int:
        b = self.builder
        n = getattr(obj, field + "Length")()
        if hasattr(type(obj), field + "AsNumpy"):  # scalars: one copy of the stored little-endian array
            return b.CreateNumpyVector(getattr(obj, field + "AsNumpy")())
        items = [getattr(obj, field)(j) for j in range(n)]
        if items and _is_struct(items[0]):  # EdgeEnd: built inline, back to front
            create = getattr(_module_of(items[0]), "Create" + type(items[0]).__name__)
            getattr(module, f"Start{field}Vector")(b, n)
            for item in reversed(items):
                create(b, item.NodeIndex(), item.SrcArgIndex(), item.DstArgIndex())
            return b.EndVector()
        offsets = [b.CreateSharedString(i) if isinstance(i, bytes) else self.table(i) for i in items]
        getattr(module, f"Start{field}Vector")(b, n)
        for offset in reversed(offsets):
            b.PrependUOffsetTRelative(offset)
        return b.EndVector()


def canonical_ort(data: bytes) -> bytes:
    """An ORT-format model's bytes -> the same content in the canonical layout (see the module docstring)."""
    inference_session, unions = _fbs()
    if not inference_session.InferenceSessionBufferHasIdentifier(data, 0):
        raise ValueError("not an ORT-format model (no ORTM file identifier)")
    root = inference_session.GetRootAs(data, 0)
    writer = _Writer(unions)
    writer.builder.Finish(writer.table(root), file_identifier=FILE_IDENTIFIER)
    return bytes(writer.builder.Output())


def ort_content(data: bytes):
    """The decoded content of an ORT-format model as nested lists and dicts (large arrays as sha256),
    independent of the byte layout: two files with equal ``ort_content`` hold the same model."""
    inference_session, unions = _fbs()

    def walk(obj):
        cls, out = type(obj), {}
        for field in _fields(_module_of(obj)):
            if not hasattr(cls, field):
                continue
            if hasattr(cls, field + "Length"):
                if getattr(obj, field + "IsNone")():
                    continue
                if hasattr(cls, field + "AsNumpy"):
                    array = getattr(obj, field + "AsNumpy")()
                    out[field] = (str(array.dtype), hashlib.sha256(array.tobytes()).hexdigest())
                else:
                    n = getattr(obj, field + "Length")()
                    out[field] = [leaf(getattr(obj, field)(j)) for j in range(n)]
                continue
            value = getattr(obj, field)()
            union = unions.get((cls.__name__, field))
            if union is not None and value is not None:
                member = union[getattr(obj, field + "Type")()]()
                member.Init(value.Bytes, value.Pos)
                value = member
            out[field] = leaf(value)
        return out

    def leaf(value):
        if hasattr(value, "_tab"):
            if _is_struct(value):
                return (value.NodeIndex(), value.SrcArgIndex(), value.DstArgIndex())
            return walk(value)
        return value

    return walk(inference_session.GetRootAs(data, 0))
