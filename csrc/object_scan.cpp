// See object_scan.h. The Python twins these must agree with live in tolaria/health/structure.py
// (same_members), tolaria/health/pairs.py (gradients) and tolaria/health/plan.py (untrusted);
// tests/test_object_scan.py compares them.
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
}

}  // namespace tolaria
