#!/usr/bin/env bash
# Installs the C library under PREFIX:
#   PREFIX/include/gantry.h
#   PREFIX/lib/libgantry.so, PREFIX/lib/libgantry.a
#   PREFIX/lib/pkgconfig/gantry.pc            (pkg-config --cflags --libs gantry)
#   PREFIX/lib/cmake/gantry/gantryConfig.cmake (find_package(gantry) -> target gantry::gantry)
# Builds with `cargo build --release -p gantry-capi` unless GANTRY_LIB_DIR names a directory
# that already holds libgantry.so and libgantry.a.
set -euo pipefail
prefix=${1:?usage: install.sh PREFIX}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ -z "${GANTRY_LIB_DIR:-}" ]; then
    cargo build --release -p gantry-capi --manifest-path "$root/Cargo.toml"
    GANTRY_LIB_DIR=${CARGO_TARGET_DIR:-$root/target}/release
fi
version=$(sed -n 's/^#define GANTRY_VERSION "\(.*\)"$/\1/p' "$here/include/gantry.h")
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/gantry"
install -m 644 "$here/include/gantry.h" "$prefix/include/gantry.h"
install -m 755 "$GANTRY_LIB_DIR/libgantry.so" "$prefix/lib/libgantry.so"
install -m 644 "$GANTRY_LIB_DIR/libgantry.a" "$prefix/lib/libgantry.a"

cat > "$prefix/lib/pkgconfig/gantry.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: gantry
Description: Stream safetensors checkpoints into GPU or host memory
Version: $version
Libs: -L\${libdir} -lgantry
Libs.private: -lpthread -ldl -lm
Cflags: -I\${includedir}
PC

cat > "$prefix/lib/cmake/gantry/gantryConfig.cmake" <<'CMAKE'
# find_package(gantry) -> imported targets gantry::gantry (shared) and gantry::gantry_static.
get_filename_component(_gantry_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET gantry::gantry)
  add_library(gantry::gantry SHARED IMPORTED)
  set_target_properties(gantry::gantry PROPERTIES
    IMPORTED_LOCATION "${_gantry_prefix}/lib/libgantry.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_gantry_prefix}/include")
  add_library(gantry::gantry_static STATIC IMPORTED)
  set_target_properties(gantry::gantry_static PROPERTIES
    IMPORTED_LOCATION "${_gantry_prefix}/lib/libgantry.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_gantry_prefix}/include"
    INTERFACE_LINK_LIBRARIES "pthread;dl;m")
endif()
set(gantry_FOUND TRUE)
CMAKE

cat > "$prefix/lib/cmake/gantry/gantryConfigVersion.cmake" <<CMAKE
set(PACKAGE_VERSION "$version")
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
CMAKE
echo "installed gantry $version under $prefix"
