# The version of lrpcpp, stated once: the `version` of pyproject.toml's [project] table.
# Sets LRPCPP_VERSION. Run as a script (cmake -P cmake/lrpcppVersion.cmake) it prints it.
file(STRINGS "${CMAKE_CURRENT_LIST_DIR}/../pyproject.toml" _lrpcpp_version_line
     REGEX "^version[ \t]*=[ \t]*\"[0-9]+\\.[0-9]+\\.[0-9]+\"")
list(LENGTH _lrpcpp_version_line _lrpcpp_version_lines)
if(NOT _lrpcpp_version_lines EQUAL 1)
  message(FATAL_ERROR "lrpcpp: expected one line `version = \"X.Y.Z\"` in pyproject.toml, "
                      "found ${_lrpcpp_version_lines}")
endif()
string(REGEX REPLACE "^version[ \t]*=[ \t]*\"([0-9.]+)\".*$" "\\1" LRPCPP_VERSION "${_lrpcpp_version_line}")
if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  message("${LRPCPP_VERSION}")
endif()
