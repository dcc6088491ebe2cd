#!/usr/bin/env bash
# Regenerate the speech test assets (see README.md in this directory).
# Needs: espeak-ng and sox (Debian/Ubuntu: apt-get install -y espeak-ng sox).
# Output is deterministic for a given espeak-ng version (sox dither is off: -D).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

VOICE="en-us"
SPEED=140

# speak TEXT OUT.wav -> 16 kHz, mono, 16-bit PCM wav
speak() {
  espeak-ng -v "$VOICE" -s "$SPEED" -w "$tmp/raw.wav" "$1"
  sox -D "$tmp/raw.wav" -r 16000 -c 1 -b 16 -e signed-integer "$2"
}

speak "Please call me when you get home."        "$here/clip1.wav"
speak "I would like a cup of coffee with milk."  "$here/clip2.wav"
speak "We are going to the park on Sunday."      "$here/clip3.wav"
speak "Open the door and turn on the light."     "$here/clip4.wav"
speak "It is a beautiful day in the city."       "$here/clip5.wav"
speak "Thank you very much for your help."       "$here/clip6.wav"

# clip1 at 44.1 kHz, stereo (both channels equal), 16-bit
sox -D "$here/clip1.wav" -r 44100 -c 2 -b 16 -e signed-integer "$here/stereo44k.wav"

# shipped example input for `make run`
mkdir -p "$repo/recipes/examples"
speak "Hello from the pipeline. This voice was made by a computer." "$repo/recipes/examples/hello.wav"

for f in "$here"/clip*.wav "$here/stereo44k.wav" "$repo/recipes/examples/hello.wav"; do
  printf '%-60s %s\n' "${f#"$repo"/}" "$(soxi -D "$f")s"
done
