/*
 * A fake NVIDIA driver library (libcuda.so.1) for engine/tests/cuda_driver.rs: exactly the CUDA
 * driver API functions engine/src/cuda/driver.rs calls, so the real driver backend runs on a
 * machine without a GPU. Built by the test with `cc -shared -fPIC`; never shipped.
 *
 * Model (as simple as possible, faithful where the engine depends on it):
 * - 2 devices, driver version 12.34 (so the test can tell it from a real driver), PCI bus ids
 *   0000:1a:00.0 and 0000:3d:00.0, compute capability 9.0.
 * - Device memory: one memfd per allocation, mapped MAP_SHARED; device pointers are these host
 *   addresses (unified addressing). A registry of regions (allocations, IPC mappings, pinned host
 *   buffers) answers cuMemGetAddressRange and cuPointerGetAttribute and bounds-checks copies.
 *   New allocations are filled with 0xA5 (device memory is not zeroed).
 * - Copies are synchronous; streams and events are plain objects (queries succeed at once).
 * - Contexts: one primary context per device, a thread-local current context. Calls that need a
 *   context fail with CUDA_ERROR_INVALID_CONTEXT without one, as the driver does; a stream or
 *   event used under another device's context is CUDA_ERROR_INVALID_HANDLE.
 * - IPC: a memory handle carries (magic, pid, fd, size, id); another process opens
 *   /proc/<pid>/fd/<fd> and maps it; opening a handle of one's own process fails with
 *   CUDA_ERROR_INVALID_CONTEXT (the real driver refuses it too). A mapping is closed in the
 *   context (device) it was opened in. Event handles name the exporter's pid and event.
 * - Kernels are not modelled: module loading and launches answer CUDA_ERROR_NOT_SUPPORTED.
 *
 * Every misuse the real driver would reject (or that would be undefined there: double destroy,
 * freeing a mapping, copying past an allocation) is printed to stderr and counted; the test reads
 * the counters through dlsym (fake_cuda_*).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_MAP_FAILED = 205,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

#define NDEV 2
#define DRIVER_VERSION 12340
#define ATTR_CC_MAJOR 75
#define ATTR_CC_MINOR 76
#define POINTER_ATTR_DEVICE_ORDINAL 9
#define IPC_LAZY_ENABLE_PEER_ACCESS 1u
#define EVENT_DISABLE_TIMING 2u
#define EVENT_INTERPROCESS 4u

#define CTX_MAGIC 0x43545821u
#define STREAM_MAGIC 0x53545245u
#define EVENT_MAGIC 0x4556454eu
#define DEAD_MAGIC 0xdeaddeadu

struct ctx {
    uint32_t magic;
    int dev;
};
struct stream {
    uint32_t magic;
    struct ctx *ctx;
};
struct event {
    uint32_t magic;
    struct ctx *ctx;
    unsigned flags;
    uint64_t id;
};
typedef struct ctx *CUcontext;
typedef struct stream *CUstream;
typedef struct event *CUevent;
typedef void *CUmodule;
typedef void *CUfunction;

typedef struct {
    char reserved[64];
} CUipcMemHandle;
typedef struct {
    char reserved[64];
} CUipcEventHandle;

/* What the 64 bytes of a handle hold here. */
struct mem_handle {
    char magic[8];
    int32_t pid;
    int32_t fd;
    uint64_t size;
    uint64_t id;
};
struct event_handle {
    char magic[8];
    int32_t pid;
    int32_t pad;
    uint64_t id;
};
_Static_assert(sizeof(struct mem_handle) <= 64, "fits a CUipcMemHandle");
_Static_assert(sizeof(struct event_handle) <= 64, "fits a CUipcEventHandle");

static struct ctx primary[NDEV] = {{CTX_MAGIC, 0}, {CTX_MAGIC, 1}};
static __thread struct ctx *current;
static int initialised;

enum region_kind { DEVICE_ALLOC, IPC_MAPPING, PINNED_HOST };
struct region {
    uint64_t base;
    uint64_t size;
    int fd; /* DEVICE_ALLOC only */
    int dev;
    enum region_kind kind;
    uint64_t id;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct region *regions;
static size_t nregions, cap_regions;
static uint64_t next_id = 1;

/* Counters for the test (read through the fake_cuda_* functions below). */
static int open_mappings, ipc_opens, ipc_exports, ctx_switches, live_allocs, live_host_allocs,
    live_events, misuses;
static long long copies;

static CUresult misuse(CUresult r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fake libcuda: misuse (error %d): ", r);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    __atomic_add_fetch(&misuses, 1, __ATOMIC_SEQ_CST);
    return r;
}

static void add(int *counter, int d) { __atomic_add_fetch(counter, d, __ATOMIC_SEQ_CST); }

/* The region containing `p` (lock held), or NULL. */
static struct region *find(uint64_t p) {
    for (size_t i = 0; i < nregions; i++) {
        if (p >= regions[i].base && p < regions[i].base + regions[i].size) {
            return &regions[i];
        }
    }
    return NULL;
}

static int push(struct region r) {
    if (nregions == cap_regions) {
        size_t cap = cap_regions ? cap_regions * 2 : 64;
        struct region *n = realloc(regions, cap * sizeof *n);
        if (!n) {
            return 0;
        }
        regions = n;
        cap_regions = cap;
    }
    regions[nregions++] = r;
    return 1;
}

static void remove_region(struct region *r) { *r = regions[--nregions]; }

#define NEED_INIT()                                                                                \
    do {                                                                                           \
        if (!initialised)                                                                          \
            return misuse(CUDA_ERROR_NOT_INITIALIZED, "%s before cuInit", __func__);               \
    } while (0)

#define NEED_CTX()                                                                                 \
    do {                                                                                           \
        NEED_INIT();                                                                               \
        if (!current)                                                                              \
            return misuse(CUDA_ERROR_INVALID_CONTEXT, "%s without a current context", __func__);   \
    } while (0)

static int valid_ctx(struct ctx *c) { return c == &primary[0] || c == &primary[1]; }
static int valid_stream(struct stream *s) { return s && s->magic == STREAM_MAGIC; }
static int valid_event(struct event *e) { return e && e->magic == EVENT_MAGIC; }

/* The stream's context must be the current one (NULL: the current context's default stream). */
static CUresult check_stream(struct stream *s, const char *fn) {
    if (!s) {
        return CUDA_SUCCESS;
    }
    if (!valid_stream(s)) {
        return misuse(CUDA_ERROR_INVALID_HANDLE, "%s: invalid stream %p", fn, (void *)s);
    }
    if (s->ctx != current) {
        return misuse(CUDA_ERROR_INVALID_HANDLE,
                      "%s: stream of device %d used while device %d's context is current", fn,
                      s->ctx->dev, current->dev);
    }
    return CUDA_SUCCESS;
}

/* A copy's range must lie inside the region it starts in (lock held). */
static CUresult check_range(uint64_t p, size_t n, const char *side) {
    struct region *r = find(p);
    if (r && p + n > r->base + r->size) {
        return misuse(CUDA_ERROR_INVALID_VALUE,
                      "cuMemcpyAsync: %s range of %zu bytes at offset %llu overruns its %llu-byte "
                      "region",
                      side, n, (unsigned long long)(p - r->base), (unsigned long long)r->size);
    }
    return CUDA_SUCCESS;
}

/* ---- initialisation, devices, contexts ------------------------------------------------------ */

CUresult cuInit(unsigned flags) {
    if (flags != 0) {
        return misuse(CUDA_ERROR_INVALID_VALUE, "cuInit(%u)", flags);
    }
    __atomic_store_n(&initialised, 1, __ATOMIC_SEQ_CST);
    return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int *v) {
    if (!v) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *v = DRIVER_VERSION;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *n) {
    NEED_INIT();
    if (!n) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *n = NDEV;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    NEED_INIT();
    if (!d) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (ordinal < 0 || ordinal >= NDEV) {
        return misuse(CUDA_ERROR_INVALID_DEVICE, "cuDeviceGet(%d)", ordinal);
    }
    *d = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    NEED_INIT();
    if (!v || d < 0 || d >= NDEV) {
        return misuse(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetAttribute(%d, device %d)", attr, d);
    }
    switch (attr) {
    case ATTR_CC_MAJOR:
        *v = 9;
        return CUDA_SUCCESS;
    case ATTR_CC_MINOR:
        *v = 0;
        return CUDA_SUCCESS;
    default:
        return CUDA_ERROR_INVALID_VALUE;
    }
}

CUresult cuDeviceGetPCIBusId(char *buf, int len, CUdevice d) {
    static const char *ids[NDEV] = {"0000:1a:00.0", "0000:3d:00.0"};
    NEED_INIT();
    if (!buf || d < 0 || d >= NDEV || len < (int)strlen(ids[0]) + 1) {
        return misuse(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetPCIBusId(len %d, device %d)", len, d);
    }
    strcpy(buf, ids[d]);
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) {
    NEED_INIT();
    if (!c || d < 0 || d >= NDEV) {
        return misuse(CUDA_ERROR_INVALID_DEVICE, "cuDevicePrimaryCtxRetain(device %d)", d);
    }
    *c = &primary[d];
    return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext *c) {
    NEED_INIT();
    if (!c) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *c = current;
    return CUDA_SUCCESS;
}

CUresult cuCtxSetCurrent(CUcontext c) {
    NEED_INIT();
    if (c && !valid_ctx(c)) {
        return misuse(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent(%p): not a context", (void *)c);
    }
    current = c;
    add(&ctx_switches, 1);
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult e, const char **s) {
    const char *n = NULL;
    switch (e) {
    case CUDA_SUCCESS: n = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: n = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: n = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NOT_INITIALIZED: n = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case CUDA_ERROR_INVALID_DEVICE: n = "CUDA_ERROR_INVALID_DEVICE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: n = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case CUDA_ERROR_MAP_FAILED: n = "CUDA_ERROR_MAP_FAILED"; break;
    case CUDA_ERROR_INVALID_HANDLE: n = "CUDA_ERROR_INVALID_HANDLE"; break;
    case CUDA_ERROR_NOT_FOUND: n = "CUDA_ERROR_NOT_FOUND"; break;
    case CUDA_ERROR_NOT_READY: n = "CUDA_ERROR_NOT_READY"; break;
    case CUDA_ERROR_NOT_SUPPORTED: n = "CUDA_ERROR_NOT_SUPPORTED"; break;
    default: break;
    }
    if (!s) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *s = n;
    return n ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* ---- memory ------------------------------------------------------------------------------- */

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    NEED_CTX();
    if (!p || n == 0) {
        return misuse(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc(%zu bytes)", n);
    }
    int fd = memfd_create("fake-cuda-device-memory", MFD_CLOEXEC);
    if (fd < 0) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (ftruncate(fd, (off_t)n) != 0) {
        close(fd);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    void *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        close(fd);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    memset(m, 0xA5, n);
    pthread_mutex_lock(&lock);
    struct region r = {(uint64_t)(uintptr_t)m, n, fd, current->dev, DEVICE_ALLOC, next_id++};
    int ok = push(r);
    pthread_mutex_unlock(&lock);
    if (!ok) {
        munmap(m, n);
        close(fd);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    add(&live_allocs, 1);
    *p = r.base;
    return CUDA_SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    NEED_INIT();
    if (p == 0) {
        return CUDA_SUCCESS;
    }
    pthread_mutex_lock(&lock);
    struct region *r = find(p);
    if (!r || r->kind != DEVICE_ALLOC || r->base != p) {
        pthread_mutex_unlock(&lock);
        return misuse(CUDA_ERROR_INVALID_VALUE, "cuMemFree(%#llx): not the base of an allocation",
                      p);
    }
    struct region gone = *r;
    remove_region(r);
    pthread_mutex_unlock(&lock);
    munmap((void *)(uintptr_t)gone.base, gone.size);
    close(gone.fd);
    add(&live_allocs, -1);
    return CUDA_SUCCESS;
}

CUresult cuMemHostAlloc(void **p, size_t n, unsigned flags) {
    NEED_CTX();
    (void)flags;
    if (!p || n == 0) {
        return misuse(CUDA_ERROR_INVALID_VALUE, "cuMemHostAlloc(%zu bytes)", n);
    }
    void *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_mutex_lock(&lock);
    struct region r = {(uint64_t)(uintptr_t)m, n, -1, -1, PINNED_HOST, next_id++};
    int ok = push(r);
    pthread_mutex_unlock(&lock);
    if (!ok) {
        munmap(m, n);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    add(&live_host_allocs, 1);
    *p = m;
    return CUDA_SUCCESS;
}

CUresult cuMemFreeHost(void *p) {
    NEED_INIT();
    pthread_mutex_lock(&lock);
    struct region *r = find((uint64_t)(uintptr_t)p);
    if (!r || r->kind != PINNED_HOST || r->base != (uint64_t)(uintptr_t)p) {
        pthread_mutex_unlock(&lock);
        return misuse(CUDA_ERROR_INVALID_VALUE, "cuMemFreeHost(%p): not a pinned allocation", p);
    }
    struct region gone = *r;
    remove_region(r);
    pthread_mutex_unlock(&lock);
    munmap((void *)(uintptr_t)gone.base, gone.size);
    add(&live_host_allocs, -1);
    return CUDA_SUCCESS;
}

CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr p) {
    NEED_CTX();
    pthread_mutex_lock(&lock);
    struct region *r = find(p);
    if (!r || r->kind == PINNED_HOST) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_NOT_FOUND;
    }
    if (base) {
        *base = r->base;
    }
    if (size) {
        *size = r->size;
    }
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

CUresult cuPointerGetAttribute(void *data, int attr, CUdeviceptr p) {
    NEED_INIT();
    if (!data || attr != POINTER_ATTR_DEVICE_ORDINAL) {
        return misuse(CUDA_ERROR_INVALID_VALUE, "cuPointerGetAttribute(attribute %d)", attr);
    }
    pthread_mutex_lock(&lock);
    struct region *r = find(p);
    int dev = r && r->kind != PINNED_HOST ? r->dev : -1;
    pthread_mutex_unlock(&lock);
    if (dev < 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *(int *)data = dev;
    return CUDA_SUCCESS;
}

CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    NEED_CTX();
    CUresult r = check_stream(s, "cuMemcpyAsync");
    if (r != CUDA_SUCCESS) {
        return r;
    }
    pthread_mutex_lock(&lock);
    r = check_range(dst, n, "destination");
    if (r == CUDA_SUCCESS) {
        r = check_range(src, n, "source");
    }
    pthread_mutex_unlock(&lock);
    if (r != CUDA_SUCCESS) {
        return r;
    }
    if (n) {
        memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
    }
    __atomic_add_fetch(&copies, 1, __ATOMIC_SEQ_CST);
    return CUDA_SUCCESS;
}

/* ---- streams and events ------------------------------------------------------------------- */

CUresult cuStreamCreate(CUstream *s, unsigned flags) {
    NEED_CTX();
    (void)flags;
    if (!s) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    struct stream *st = malloc(sizeof *st);
    if (!st) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    st->magic = STREAM_MAGIC;
    st->ctx = current;
    *s = st;
    return CUDA_SUCCESS;
}

CUresult cuStreamQuery(CUstream s) {
    NEED_INIT();
    if (s && !valid_stream(s)) {
        return misuse(CUDA_ERROR_INVALID_HANDLE, "cuStreamQuery(%p)", (void *)s);
    }
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream s) {
    NEED_INIT();
    if (s && !valid_stream(s)) {
        return misuse(CUDA_ERROR_INVALID_HANDLE, "cuStreamSynchronize(%p)", (void *)s);
    }
    return CUDA_SUCCESS;
}

static struct event *new_event(unsigned flags, uint64_t id) {
    struct event *e = malloc(sizeof *e);
    if (e) {
        e->magic = EVENT_MAGIC;
        e->ctx = current;
        e->flags = flags;
        e->id = id;
        add(&live_events, 1);
    }
    return e;
}

CUresult cuEventCreate(CUevent *e, unsigned flags) {
    NEED_CTX();
    if (!e) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    pthread_mutex_lock(&lock);
    uint64_t id = next_id++;
    pthread_mutex_unlock(&lock);
    *e = new_event(flags, id);
    return *e ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult cuEventRecord(CUevent e, CUstream s) {
    NEED_CTX();
    if (!valid_event(e)) {
        return misuse(CUDA_ERROR_INVALID_HANDLE, "cuEventRecord: invalid event %p", (void *)e);
    }
    CUresult r = check_stream(s, "cuEventRecord");
    if (r != CUDA_SUCCESS) {
        return r;
    }
    if (e->ctx != current) {
        return misuse(CUDA_ERROR_INVALID_HANDLE,
                      "cuEventRecord: event of device %d recorded under device %d's context",
                      e->ctx->dev, current->dev);
    }
    return CUDA_SUCCESS;
}

CUresult cuEventQuery(CUevent e) {
    NEED_INIT();
    if (!valid_event(e)) {
        return misuse(CUDA_ERROR_INVALID_HANDLE, "cuEventQuery: invalid or destroyed event %p",
                      (void *)e);
    }
    return CUDA_SUCCESS;
}

CUresult cuEventDestroy_v2(CUevent e) {
    NEED_INIT();
    if (!valid_event(e)) {
        return misuse(CUDA_ERROR_INVALID_HANDLE, "cuEventDestroy: invalid or destroyed event %p",
                      (void *)e);
    }
    /* Kept (not freed) so that a second destroy or a later use is seen. */
    e->magic = DEAD_MAGIC;
    add(&live_events, -1);
    return CUDA_SUCCESS;
}

CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
    NEED_CTX();
    CUresult r = check_stream(s, "cuStreamWaitEvent");
    if (r != CUDA_SUCCESS) {
        return r;
    }
    if (!valid_event(e) || flags != 0) {
        return misuse(CUDA_ERROR_INVALID_HANDLE, "cuStreamWaitEvent(event %p, flags %u)",
                      (void *)e, flags);
    }
    return CUDA_SUCCESS;
}

/* ---- IPC ---------------------------------------------------------------------------------- */

CUresult cuIpcGetMemHandle(CUipcMemHandle *h, CUdeviceptr p) {
    NEED_CTX();
    if (!h) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    pthread_mutex_lock(&lock);
    struct region *r = find(p);
    if (!r || r->kind != DEVICE_ALLOC || r->base != p) {
        pthread_mutex_unlock(&lock);
        return misuse(CUDA_ERROR_INVALID_VALUE,
                      "cuIpcGetMemHandle(%#llx): not the base of a cuMemAlloc allocation", p);
    }
    struct mem_handle mh = {"FAKECUMH", (int32_t)getpid(), r->fd, r->size, r->id};
    pthread_mutex_unlock(&lock);
    memset(h, 0, sizeof *h);
    memcpy(h->reserved, &mh, sizeof mh);
    add(&ipc_exports, 1);
    return CUDA_SUCCESS;
}

CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *p, CUipcMemHandle h, unsigned flags) {
    NEED_CTX();
    struct mem_handle mh;
    memcpy(&mh, h.reserved, sizeof mh);
    if (!p || memcmp(mh.magic, "FAKECUMH", 8) != 0 || flags != IPC_LAZY_ENABLE_PEER_ACCESS) {
        return misuse(CUDA_ERROR_INVALID_VALUE, "cuIpcOpenMemHandle: bad handle or flags %u",
                      flags);
    }
    if (mh.pid == (int32_t)getpid()) {
        return misuse(CUDA_ERROR_INVALID_CONTEXT,
                      "cuIpcOpenMemHandle: a handle of this same process");
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", mh.pid, mh.fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        return misuse(CUDA_ERROR_INVALID_HANDLE,
                      "cuIpcOpenMemHandle: %s is gone (exporter freed or exited)", path);
    }
    struct stat stt;
    if (fstat(fd, &stt) != 0 || (uint64_t)stt.st_size != mh.size) {
        close(fd);
        return misuse(CUDA_ERROR_INVALID_HANDLE, "cuIpcOpenMemHandle: %s is not that allocation",
                      path);
    }
    void *m = mmap(NULL, mh.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        return CUDA_ERROR_MAP_FAILED;
    }
    pthread_mutex_lock(&lock);
    struct region r = {(uint64_t)(uintptr_t)m, mh.size, -1, current->dev, IPC_MAPPING,
                       next_id++};
    int ok = push(r);
    pthread_mutex_unlock(&lock);
    if (!ok) {
        munmap(m, mh.size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    add(&open_mappings, 1);
    add(&ipc_opens, 1);
    *p = r.base;
    return CUDA_SUCCESS;
}

CUresult cuIpcCloseMemHandle(CUdeviceptr p) {
    NEED_CTX();
    pthread_mutex_lock(&lock);
    struct region *r = find(p);
    if (!r || r->kind != IPC_MAPPING || r->base != p) {
        pthread_mutex_unlock(&lock);
        return misuse(CUDA_ERROR_INVALID_VALUE,
                      "cuIpcCloseMemHandle(%#llx): not an open IPC mapping", p);
    }
    if (r->dev != current->dev) {
        int dev = r->dev;
        pthread_mutex_unlock(&lock);
        return misuse(CUDA_ERROR_INVALID_CONTEXT,
                      "cuIpcCloseMemHandle: mapping opened on device %d closed under device %d",
                      dev, current->dev);
    }
    struct region gone = *r;
    remove_region(r);
    pthread_mutex_unlock(&lock);
    munmap((void *)(uintptr_t)gone.base, gone.size);
    add(&open_mappings, -1);
    return CUDA_SUCCESS;
}

CUresult cuIpcGetEventHandle(CUipcEventHandle *h, CUevent e) {
    NEED_INIT();
    if (!h || !valid_event(e)) {
        return misuse(CUDA_ERROR_INVALID_HANDLE, "cuIpcGetEventHandle: invalid event %p",
                      (void *)e);
    }
    unsigned need = EVENT_INTERPROCESS | EVENT_DISABLE_TIMING;
    if ((e->flags & need) != need) {
        return misuse(CUDA_ERROR_INVALID_VALUE,
                      "cuIpcGetEventHandle: event created with flags %u (needs INTERPROCESS | "
                      "DISABLE_TIMING)",
                      e->flags);
    }
    struct event_handle eh = {"FAKECUEV", (int32_t)getpid(), 0, e->id};
    memset(h, 0, sizeof *h);
    memcpy(h->reserved, &eh, sizeof eh);
    return CUDA_SUCCESS;
}

CUresult cuIpcOpenEventHandle(CUevent *e, CUipcEventHandle h) {
    NEED_CTX();
    struct event_handle eh;
    memcpy(&eh, h.reserved, sizeof eh);
    if (!e || memcmp(eh.magic, "FAKECUEV", 8) != 0) {
        return misuse(CUDA_ERROR_INVALID_VALUE, "cuIpcOpenEventHandle: bad handle");
    }
    if (eh.pid == (int32_t)getpid()) {
        return misuse(CUDA_ERROR_INVALID_CONTEXT,
                      "cuIpcOpenEventHandle: a handle of this same process");
    }
    *e = new_event(EVENT_INTERPROCESS | EVENT_DISABLE_TIMING, eh.id);
    return *e ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

/* ---- kernels (not modelled) --------------------------------------------------------------- */

CUresult cuModuleLoadData(CUmodule *m, const void *image) {
    (void)m;
    (void)image;
    return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
    (void)f;
    (void)m;
    (void)name;
    return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, CUstream s, void **args,
                        void **extra) {
    (void)f, (void)gx, (void)gy, (void)gz, (void)bx, (void)by, (void)bz, (void)shared, (void)s;
    (void)args, (void)extra;
    return CUDA_ERROR_NOT_SUPPORTED;
}

/* ---- counters for the test ---------------------------------------------------------------- */

#define COUNTER(name, var)                                                                         \
    int fake_cuda_##name(void) { return __atomic_load_n(&var, __ATOMIC_SEQ_CST); }
COUNTER(open_mappings, open_mappings)
COUNTER(ipc_opens, ipc_opens)
COUNTER(ipc_exports, ipc_exports)
COUNTER(ctx_switches, ctx_switches)
COUNTER(live_allocs, live_allocs)
COUNTER(live_host_allocs, live_host_allocs)
COUNTER(live_events, live_events)
COUNTER(misuses, misuses)

long long fake_cuda_copies(void) { return __atomic_load_n(&copies, __ATOMIC_SEQ_CST); }
