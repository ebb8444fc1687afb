// See object_scan.h. The Python twins these must agree with live in tolaria/health/structure.py
// (same_members), tolaria/health/pairs.py (gradients), tolaria/health/plan.py (untrusted) and
// tolaria/addresses.py (addresses); tests/test_object_scan.py and tests/test_addresses.py
// compare them.
#include "object_scan.h"

#include <Python.h>

namespace py = pybind11;

namespace tolaria {
namespace {

// The holder `key` of one module's instance dict, borrowed; nullptr when it is missing (a
// Python error is set only when the lookup itself failed).
PyObject* holder(PyObject* module_dict, PyObject* key) {
  if (!PyDict_Check(module_dict)) {
    return nullptr;
  }
  return PyDict_GetItemWithError(module_dict, key);
}

// Whether every module dict still holds, under `sized_keys`, containers of the recorded sizes
// and, under `valued_keys`, dicts whose values are the very objects recorded (in order, all
// modules concatenated). Order of the walk: module by module, sized keys then valued keys, as
// the Python twin records them.
bool same_members(py::tuple module_dicts, py::tuple valued_keys, py::tuple sized_keys, py::tuple values,
                  py::tuple sizes) {
  const Py_ssize_t n_values = PyTuple_GET_SIZE(values.ptr());
  const Py_ssize_t n_sizes = PyTuple_GET_SIZE(sizes.ptr());
  Py_ssize_t value_at = 0;
  Py_ssize_t size_at = 0;
  for (py::handle module_dict : module_dicts) {
    for (py::handle key : sized_keys) {
      PyObject* sized = holder(module_dict.ptr(), key.ptr());
      if (sized == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        return false;
      }
      // Held across the call: a container's __len__ is Python code that could drop it.
      py::object held = py::reinterpret_borrow<py::object>(sized);
      const Py_ssize_t length = PyObject_Size(held.ptr());
      if (length < 0) {  // as the twin: a holder without a size reads as changed, other errors raise
        if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_KeyError)) {
          throw py::error_already_set();
        }
        PyErr_Clear();
        return false;
      }
      if (size_at >= n_sizes) return false;
      const Py_ssize_t recorded = PyLong_AsSsize_t(PyTuple_GET_ITEM(sizes.ptr(), size_at++));
      if (recorded == -1 && PyErr_Occurred()) throw py::error_already_set();
      if (length != recorded) return false;
    }
    for (py::handle key : valued_keys) {
      PyObject* members = holder(module_dict.ptr(), key.ptr());
      if (members == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        return false;
      }
      if (!PyDict_Check(members)) return false;
      Py_ssize_t position = 0;
      PyObject* dict_key = nullptr;
      PyObject* value = nullptr;
      while (PyDict_Next(members, &position, &dict_key, &value)) {
        if (value_at >= n_values || value != PyTuple_GET_ITEM(values.ptr(), value_at)) return false;
        ++value_at;
      }
    }
  }
  return value_at == n_values && size_at == n_sizes;
}

// The `.grad` of each parameter that has one, in order, and the indices of those parameters
// (None when every parameter has one: the common case needs no index list).
py::tuple gradients(py::tuple params) {
  static PyObject* grad_name = PyUnicode_InternFromString("grad");
  const Py_ssize_t count = PyTuple_GET_SIZE(params.ptr());
  py::list grads(0);
  py::object present = py::none();
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* grad = PyObject_GetAttr(PyTuple_GET_ITEM(params.ptr(), i), grad_name);
    if (grad == nullptr) throw py::error_already_set();
    py::object owned = py::reinterpret_steal<py::object>(grad);
    if (grad == Py_None) {
      if (present.is_none()) {  // the first missing one: every earlier parameter had a gradient
        py::list indices(i);
        for (Py_ssize_t j = 0; j < i; ++j) {
          PyObject* index = PyLong_FromSsize_t(j);
          if (index == nullptr) throw py::error_already_set();
          PyList_SET_ITEM(indices.ptr(), j, index);
        }
        present = std::move(indices);
      }
      continue;
    }
    if (PyList_Append(grads.ptr(), grad) < 0) throw py::error_already_set();
    if (!present.is_none()) {
      py::int_ index(i);
      if (PyList_Append(present.ptr(), index.ptr()) < 0) throw py::error_already_set();
    }
  }
  return py::make_tuple(grads, present);
}

// Trust states of a plan's tensors, one byte each (tolaria/health/plan.py owns the meaning).
constexpr char kNotTrusted = 0;
constexpr char kTrusted = 1;

// The object a Python int from id() names (nullptr with a Python error set when it is not one).
void* address_of(PyObject* id) {
  void* address = PyLong_AsVoidPtr(id);
  if (address == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return address;
}

// Which objects a plan must compare: every i where objects[i] is not the trusted object
// (trusted_ids[i] with state[i] == kTrusted). Of those never trusted (kNotTrusted), `repeated`
// lists the ones that are the object seen at i last time (seen_ids[i]); for the others
// seen_ids[i] becomes id(objects[i]). id() is the object's address, so this compares pointers.
py::tuple untrusted(py::handle objects, py::list trusted_ids, py::bytearray state, py::list seen_ids) {
  py::object items = py::reinterpret_steal<py::object>(
      PySequence_Fast(objects.ptr(), "objects must be a list or a tuple"));
  if (!items) throw py::error_already_set();
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(items.ptr());
  if (PyList_GET_SIZE(trusted_ids.ptr()) != count || PyByteArray_GET_SIZE(state.ptr()) != count ||
      PyList_GET_SIZE(seen_ids.ptr()) != count) {
    throw py::value_error("objects, trusted_ids, state and seen_ids must have the same length");
  }
  PyObject** item = PySequence_Fast_ITEMS(items.ptr());
  const char* states = PyByteArray_AS_STRING(state.ptr());
  py::list compare(0);
  py::list repeated(0);
  for (Py_ssize_t i = 0; i < count; ++i) {
    void* object = static_cast<void*>(item[i]);
    const char at = states[i];
    if (at == kTrusted && object == address_of(PyList_GET_ITEM(trusted_ids.ptr(), i))) continue;
    py::int_ index(i);
    if (PyList_Append(compare.ptr(), index.ptr()) < 0) throw py::error_already_set();
    if (at != kNotTrusted) continue;
    if (object == address_of(PyList_GET_ITEM(seen_ids.ptr(), i))) {
      if (PyList_Append(repeated.ptr(), index.ptr()) < 0) throw py::error_already_set();
    } else {
      PyObject* id = PyLong_FromVoidPtr(object);
      if (id == nullptr) throw py::error_already_set();
      PyList_SetItem(seen_ids.ptr(), i, id);  // steals the new int, drops the old one
    }
  }
  return py::make_tuple(compare, repeated);
}

// -- data addresses ---------------------------------------------------------------------------
// torch exports a C function that reads a tensor's data pointer from its Python object (its
// compiled-code caches call it; tolaria/addresses.py finds its address and binds it here after a
// self-test). Called directly it costs a few nanoseconds, against about 55 for Tensor.data_ptr().
// Only objects whose type is exactly one of `exact` (torch.Tensor, nn.Parameter) take it: a
// subclass may answer data_ptr() through __torch_function__, so it, and anything the reader
// refuses (a C++ exception: a sparse tensor, a tensor without storage), gets `fallback(object)`,
// the unbound Tensor.data_ptr, which returns the same answer or raises the Python error.
using AddressReader = void* (*)(PyObject*);
AddressReader address_reader = nullptr;
py::tuple* exact_types = nullptr;     // module lifetime: never freed (interpreter teardown order)
py::object* address_fallback = nullptr;

void bind_address_reader(py::int_ reader, py::tuple exact, py::object fallback) {
  if (!PyCallable_Check(fallback.ptr())) throw py::type_error("fallback must be callable");
  for (py::handle type : exact) {
    if (!PyType_Check(type.ptr())) throw py::type_error("exact must hold types");
  }
  void* address = PyLong_AsVoidPtr(reader.ptr());
  if (address == nullptr && PyErr_Occurred()) throw py::error_already_set();
  if (exact_types == nullptr) {
    exact_types = new py::tuple(exact);
    address_fallback = new py::object(fallback);
  } else {
    *exact_types = exact;
    *address_fallback = fallback;
  }
  address_reader = reinterpret_cast<AddressReader>(address);  // 0 unbinds: fallback for all
}

bool reads_directly(PyObject* object) {
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(object));
  for (py::handle exact : *exact_types) {
    if (exact.ptr() == type) return true;
  }
  return false;
}

// The data address of each object, in order, as a tuple of ints (what
// tuple(map(torch.Tensor.data_ptr, objects)) returns, or the error it raises).
py::tuple addresses(py::handle objects) {
  if (address_fallback == nullptr) throw std::runtime_error("bind_address_reader was never called");
  py::object items = py::reinterpret_steal<py::object>(
      PySequence_Fast(objects.ptr(), "objects must be a list or a tuple"));
  if (!items) throw py::error_already_set();
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(items.ptr());
  PyObject** item = PySequence_Fast_ITEMS(items.ptr());
  py::tuple result(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* object = item[i];
    bool read = false;
    void* address = nullptr;
    if (address_reader != nullptr && reads_directly(object)) {
      try {
        address = address_reader(object);
        read = true;
      } catch (...) {  // refused by torch: the fallback raises the matching Python error
      }
    }
    PyObject* value =
        read ? PyLong_FromVoidPtr(address) : PyObject_CallOneArg(address_fallback->ptr(), object);
    if (value == nullptr) throw py::error_already_set();
    PyTuple_SET_ITEM(result.ptr(), i, value);  // steals the new int
  }
  return result;
}

}  // namespace

void register_object_scan(py::module_& m) {
  m.def("same_members", &same_members, py::arg("module_dicts"), py::arg("valued_keys"),
        py::arg("sized_keys"), py::arg("values"), py::arg("sizes"),
        "Whether each module instance dict in module_dicts still holds, under each of sized_keys, "
        "a container of the recorded length (sizes, in walk order) and, under each of valued_keys, "
        "a dict whose values are the very objects recorded (values, in walk order). A missing "
        "holder or a holder that is not a dict reads as changed (False).");
  m.def("gradients", &gradients, py::arg("params"),
        "(grads, present): the .grad of every parameter in the tuple params that has one, in order, "
        "and the indices of those parameters, or None for present when every one has a gradient.");
  m.def("untrusted", &untrusted, py::arg("objects"), py::arg("trusted_ids"), py::arg("state"),
        py::arg("seen_ids"),
        "(compare, repeated): the indices i where objects[i] is not the trusted object (trusted_ids[i] "
        "while state[i] == 1), and of those with state[i] == 0 the ones that are the object whose "
        "id() seen_ids[i] holds; every other of those gets seen_ids[i] = id(objects[i]). objects is a "
        "list or a tuple, trusted_ids and seen_ids lists of ints, state a bytearray, all of one length.");
  m.def("bind_address_reader", &bind_address_reader, py::arg("reader"), py::arg("exact"), py::arg("fallback"),
        "Make addresses() call the C function at address reader (void* f(PyObject*), torch's data "
        "pointer reader; 0: none) for objects whose type is one of the types in exact, and "
        "fallback(object) for every other object or one the reader refuses.");
  m.def("addresses", &addresses, py::arg("objects"),
        "The data address of each object in the list or tuple objects, as a tuple of ints (see "
        "bind_address_reader); raises what fallback raises for an object it cannot read.");
}

}  // namespace tolaria
