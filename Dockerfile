# The image both nodes of docker-compose.yml run: mfd, installed from this repository's source.
# BASE is any Debian-like image with python3 >= 3.11 and its venv module. The default is the
# public Python image; without a registry, build a local base with tests/docker/base-image.sh
# and pass it: docker compose build --build-arg BASE=... (or MFD_BASE_IMAGE=... in the shell).
ARG BASE=python:3.11-slim
FROM ${BASE}

# the dependencies first, in their own layer: a change to mfd's source does not reinstall them
COPY pyproject.toml README.md /src/
RUN python3 -m venv /opt/mfd \
 && mkdir /src/mfd && touch /src/mfd/__init__.py \
 && /opt/mfd/bin/pip install --no-cache-dir --disable-pip-version-check /src \
 && /opt/mfd/bin/pip uninstall -y -q mfd \
 && rm -rf /src/mfd /src/build /src/*.egg-info

COPY mfd /src/mfd
RUN /opt/mfd/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps /src \
 && rm -rf /src

# /dev/kvm where the host has KVM: docker-compose.yml lets the container use the KVM device
# (char 10:232, its device_cgroup_rules) and this makes the node; on a host without KVM the
# node cannot be opened, and mfd demo runs its built-in guest instead
# (and /dev/userfaultfd for postcopy, where the host has one: its minor is the host's)
RUN printf '%s\n' '#!/bin/sh' \
      '[ -e /dev/kvm ] || mknod -m 600 /dev/kvm c 10 232 2>/dev/null' \
      'uffd=$(cat /sys/class/misc/userfaultfd/dev 2>/dev/null)' \
      '[ -e /dev/userfaultfd ] || [ -z "$uffd" ] ||' \
      '  mknod -m 600 /dev/userfaultfd c "${uffd%:*}" "${uffd#*:}" 2>/dev/null' \
      'exec mfd "$@"' > /usr/local/bin/mfd-entrypoint \
 && chmod 755 /usr/local/bin/mfd-entrypoint

# unbuffered: docker logs shows each line as it is printed
ENV PATH=/opt/mfd/bin:$PATH PYTHONUNBUFFERED=1
ENTRYPOINT ["mfd-entrypoint"]
CMD ["demo"]
