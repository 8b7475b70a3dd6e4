# One image for every Despina service; compose.yaml picks the command per container.
# Build arguments (docs/deployment.md#docker-and-kubernetes has the whole list):
#   BASE_IMAGE       any Debian/Ubuntu image; python3 (>= 3.10) is installed when it lacks one
#   DESPINA_EXTRAS   "pytorch" (CPU image) or "pytorch,gpu" (GPU image, on a CUDA base)
#   TORCH_INDEX_URL  an extra index for PyTorch: the CPU build by default (its local
#                    version, +cpu, wins over the main index's); empty: the main index
#   TORCH_SPEC       the PyTorch requirement, e.g. torch==2.13.0+cpu to pin the CPU build
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, PIP_CERT, PIP_CONSTRAINT
#                    the builder's pip settings, used only while building when given
# Files in deploy/docker/pip/ (ignored by git) reach pip too: *.crt/*.pem are trusted
# on top of pip's own CA bundle, constraints.txt constrains every install.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG DESPINA_EXTRAS=pytorch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.1,<2.15"
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
ARG PIP_CERT=
ARG PIP_CONSTRAINT=

# A base without Python (a CUDA runtime image, a bare Debian) gets the distribution's.
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/despina
COPY deploy/docker/pip /tmp/pip
COPY pyproject.toml README.md ./
COPY common ./common
COPY services ./services
# Empty build arguments are unset (pip would read an empty PIP_CERT as a path); the
# files from deploy/docker/pip/ fill in what the arguments leave out. Nothing of them
# stays in the image.
RUN set -eu; \
    for v in PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_CERT PIP_CONSTRAINT; do \
        eval "[ -n \"\${$v}\" ] || unset $v"; \
    done; \
    certs="$(find /tmp/pip -maxdepth 1 -name '*.crt' -o -maxdepth 1 -name '*.pem')"; \
    if [ -z "${PIP_CERT:-}" ] && [ -n "$certs" ]; then \
        python3 -c 'import pip._vendor.certifi as c; print(open(c.where()).read())' \
            | cat - $certs > /tmp/pip/bundle.ca; \
        export PIP_CERT=/tmp/pip/bundle.ca; \
    fi; \
    if [ -z "${PIP_CONSTRAINT:-}" ] && [ -f /tmp/pip/constraints.txt ]; then \
        export PIP_CONSTRAINT=/tmp/pip/constraints.txt; \
    fi; \
    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1; \
    case ",${DESPINA_EXTRAS}," in \
        *,pytorch,*) \
            if [ -n "${TORCH_INDEX_URL}" ]; then \
                PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-} ${TORCH_INDEX_URL}" \
                    pip install "${TORCH_SPEC}"; \
            else \
                pip install "${TORCH_SPEC}"; \
            fi ;; \
    esac; \
    if [ -n "${DESPINA_EXTRAS}" ]; then pip install ".[${DESPINA_EXTRAS}]"; else pip install .; fi; \
    case ",${DESPINA_EXTRAS}," in \
        *,gpu,*) \
            # onnxruntime-gpu ships the same module as onnxruntime: the CUDA build must win.
            pip uninstall -y onnxruntime \
            && pip install --force-reinstall --no-deps "$(pip freeze | grep -i '^onnxruntime-gpu==')" ;; \
    esac; \
    rm -rf /tmp/pip

COPY model_repository /models
ENTRYPOINT ["despina"]
