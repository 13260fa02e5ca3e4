#!/usr/bin/env bash
# Builds medtwin's worker images and pushes them to Artifact Registry:
#   REGION-docker.pkg.dev/PROJECT/REPO/medtwin-worker:TAG   (Dockerfile, CPU)
#   REGION-docker.pkg.dev/PROJECT/REPO/medtwin-gpu:TAG      (Dockerfile.gpu, CUDA)
# with Cloud Build (default; nothing to install but gcloud) or a local Docker (--local).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch/containers/build.sh --project PROJECT --region REGION [options]

Builds the worker images from the repository root and pushes them to
REGION-docker.pkg.dev/PROJECT/REPO/{medtwin-worker,medtwin-gpu}:TAG.

  --project P    Google Cloud project (or env PROJECT)
  --region R     Artifact Registry location, the Dataflow region, e.g. europe-west4 (or env REGION)
  --repo NAME    Artifact Registry Docker repository [medtwin] (or env REPO)
  --tag TAG      image tag [the commit, git rev-parse --short=12 HEAD] (or env TAG); never "latest":
                 workers must get the image the job was tested with
  --only cpu|gpu build one of the two images [both]
  --local        docker build + docker push here (needs `gcloud auth configure-docker
                 REGION-docker.pkg.dev` once) instead of Cloud Build
  --dry-run      print the commands, run nothing
  -h, --help     this message

The repository must exist: gcloud artifacts repositories create REPO --repository-format=docker --location=REGION
EOF
}

die() { echo "build.sh: $*" >&2; echo "(--help for usage)" >&2; exit 2; }

PROJECT="${PROJECT:-}"
REGION="${REGION:-}"
REPO="${REPO:-medtwin}"
TAG="${TAG:-}"
ONLY=""
LOCAL=0
DRY_RUN=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --region) REGION="${2:?--region needs a value}"; shift 2 ;;
    --repo) REPO="${2:?--repo needs a value}"; shift 2 ;;
    --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
    --only) ONLY="${2:?--only needs cpu or gpu}"; shift 2 ;;
    --local) LOCAL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ -n "$PROJECT" ]] || die "give --project (or PROJECT)"
[[ -n "$REGION" ]] || die "give --region (or REGION)"
if [[ -z "$TAG" ]]; then
  TAG="$(git -C "$ROOT" rev-parse --short=12 HEAD)" || die "not a git checkout: give --tag"
  if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]]; then
    echo "build.sh: warning: uncommitted changes are built into the images tagged $TAG" >&2
  fi
fi
[[ "$TAG" != "latest" ]] || die "refusing the mutable tag 'latest': tag images by commit or release"
case "$ONLY" in
  "") FLAVOURS=(cpu gpu) ;;
  cpu|gpu) FLAVOURS=("$ONLY") ;;
  *) die "--only takes cpu or gpu, not '$ONLY'" ;;
esac

run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

for flavour in "${FLAVOURS[@]}"; do
  if [[ "$flavour" == cpu ]]; then
    dockerfile=launch/containers/Dockerfile; name=medtwin-worker
  else
    dockerfile=launch/containers/Dockerfile.gpu; name=medtwin-gpu
  fi
  image="${REGION}-docker.pkg.dev/${PROJECT}/${REPO}/${name}:${TAG}"
  echo "build.sh: $dockerfile -> $image" >&2
  if [[ $LOCAL -eq 1 ]]; then
    # Dataflow and most Flink clusters run x86-64, whatever this machine is.
    run env DOCKER_BUILDKIT=1 docker build --platform linux/amd64 --file "$ROOT/$dockerfile" --tag "$image" "$ROOT"
    run docker push "$image"
  else
    # The context is the repository root, less what .gitignore (or a .gcloudignore) leaves out.
    run gcloud builds submit "$ROOT" --project "$PROJECT" --config "$HERE/cloudbuild.yaml" \
      --substitutions "_DOCKERFILE=${dockerfile},_IMAGE=${image}"
  fi
done

echo "build.sh: pass --sdk_container_image ${REGION}-docker.pkg.dev/${PROJECT}/${REPO}/<image>:${TAG}" >&2
