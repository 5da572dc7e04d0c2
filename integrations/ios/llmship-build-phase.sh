#!/bin/bash
# Xcode "Run Script" build phase: build llmship's iOS artifacts and copy them into the app bundle.
#
# In the target's Build Phases, add a Run Script phase before "Copy Bundle Resources" with:
#     "${SRCROOT}/llmship/integrations/ios/llmship-build-phase.sh"
# and set its Input File Lists to  $(SRCROOT)/llmship/integrations/ios/llmship-inputs.xcfilelist
#             Output File Lists to $(SRCROOT)/llmship/integrations/ios/llmship-outputs.xcfilelist
# Xcode then skips the phase when no input is newer than the outputs. When it does run, llmship's own
# input hash makes an unchanged target a no-op, and a failed gate fails the Xcode build.
#
# Settings (environment or build settings): LLMSHIP_ROOT (the llmship checkout, default $SRCROOT/llmship),
# LLMSHIP_CONFIG (default $SRCROOT/llmship.yaml), LLMSHIP_OUT (default $SRCROOT/build/llmship/$CONFIGURATION).
set -euo pipefail

: "${SRCROOT:?run this from an Xcode build phase (SRCROOT is not set)}"
: "${TARGET_BUILD_DIR:?TARGET_BUILD_DIR is not set}"
: "${UNLOCALIZED_RESOURCES_FOLDER_PATH:?UNLOCALIZED_RESOURCES_FOLDER_PATH is not set}"
CONFIGURATION="${CONFIGURATION:-Debug}"

LLMSHIP_ROOT="${LLMSHIP_ROOT:-$SRCROOT/llmship}"
LLMSHIP_CONFIG="${LLMSHIP_CONFIG:-$SRCROOT/llmship.yaml}"
LLMSHIP_OUT="${LLMSHIP_OUT:-$SRCROOT/build/llmship/$CONFIGURATION}"

echo "llmship: building iOS artifacts ($CONFIGURATION) from $LLMSHIP_CONFIG"
make -C "$LLMSHIP_ROOT" ios CONFIG="$LLMSHIP_CONFIG" OUT="$LLMSHIP_OUT"

SRC="$LLMSHIP_OUT/ios/Resources/llmship"
DEST="$TARGET_BUILD_DIR/$UNLOCALIZED_RESOURCES_FOLDER_PATH/llmship"
# Replace, never merge: a target dropped from the config must not linger in the bundle.
rm -rf "$DEST"
mkdir -p "$DEST"
cp -R "$SRC/." "$DEST/"
echo "llmship: copied $(find "$DEST" -type f | wc -l | tr -d ' ') files to $DEST"
