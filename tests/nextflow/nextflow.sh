#!/usr/bin/env bash
# The Nextflow runtime resolved from Maven Central (tests/nextflow/runtime/pom.xml, built by
# `make nextflow-runtime` into tests/nextflow/runtime/lib), launched as the `nextflow` script
# launches it: the same JVM options (Kryo and the NIO file systems need the opened packages).
#   tests/nextflow/nextflow.sh run main.nf -profile test ...     (local executor, no containers)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lib="${NXF_RUNTIME_LIB:-$here/runtime/lib}"
if [[ ! -f "$lib/.complete" ]]; then
    echo "nextflow.sh: no runtime in $lib (run: make nextflow-runtime)" >&2
    exit 2
fi
opens=(java.lang java.io java.nio java.net java.util java.util.concurrent.locks java.util.concurrent.atomic
       java.util.regex sun.nio.ch sun.nio.fs sun.net.www.protocol.http sun.net.www.protocol.https
       sun.net.www.protocol.ftp sun.net.www.protocol.file jdk.internal.misc jdk.internal.vm)
jvm=(-Dfile.encoding=UTF-8 -XX:+TieredCompilation -XX:TieredStopAtLevel=1 -Xms64m -Xmx1g)
for package in "${opens[@]}"; do jvm+=("--add-opens=java.base/${package}=ALL-UNNAMED"); done
exec java "${jvm[@]}" -cp "$lib/*" nextflow.cli.Launcher "$@"
