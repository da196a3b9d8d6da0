#!/bin/sh
# SageMaker starts the container with the argument `serve`; anything else runs as a command.
set -e
if [ "${1:-serve}" = "serve" ]; then
    exec torchserve --start --foreground --ncs --ts-config /home/model-server/config.properties
fi
exec "$@"
