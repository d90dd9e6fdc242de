# Imported targets for the LibTorch inside the installed torch wheel.
#
# TorchConfig.cmake from the wheel insists on a full CUDA toolkit layout and
# overrides CMAKE_CUDA_ARCHITECTURES with its own list, so we ask the Python
# package where its headers and libraries are instead.
execute_process(
  COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/torch_info.py"
  OUTPUT_VARIABLE _torch_info OUTPUT_STRIP_TRAILING_WHITESPACE
  ERROR_VARIABLE _torch_err
  RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "moeflux needs torch importable from ${Python_EXECUTABLE}: ${_torch_err}")
endif()
string(REPLACE "|" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 _torch_includes)
string(REPLACE "," ";" _torch_includes "${_torch_includes}")
list(GET _torch_info 1 TORCH_LIB_DIR)
list(GET _torch_info 2 _torch_abi)
list(GET _torch_info 3 TORCH_VERSION)
list(LENGTH _torch_info _n)
set(TORCH_CUDA_VERSION "")
if(_n GREATER 4)
  list(GET _torch_info 4 TORCH_CUDA_VERSION)
endif()
if(TORCH_VERSION VERSION_LESS 2.11)
  message(FATAL_ERROR "moeflux needs torch >= 2.11, found ${TORCH_VERSION}")
endif()

function(_moeflux_torch_lib name)
  find_library(_lib_${name} NAMES ${name} PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
  set(_moeflux_lib "${_lib_${name}}" PARENT_SCOPE)
endfunction()

add_library(moeflux::torch INTERFACE IMPORTED)
set(_libs)
foreach(name c10 torch_cpu torch)
  _moeflux_torch_lib(${name})
  list(APPEND _libs "${_moeflux_lib}")
endforeach()
set_target_properties(moeflux::torch PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${_torch_includes}"
  INTERFACE_SYSTEM_INCLUDE_DIRECTORIES "${_torch_includes}"
  INTERFACE_COMPILE_DEFINITIONS "_GLIBCXX_USE_CXX11_ABI=${_torch_abi}"
  INTERFACE_LINK_LIBRARIES "${_libs}")

if(TORCH_CUDA_VERSION)
  add_library(moeflux::torch_cuda INTERFACE IMPORTED)
  set(_libs)
  foreach(name c10_cuda torch_cuda)
    _moeflux_torch_lib(${name})
    list(APPEND _libs "${_moeflux_lib}")
  endforeach()
  set_target_properties(moeflux::torch_cuda PROPERTIES INTERFACE_LINK_LIBRARIES "${_libs}")
endif()
