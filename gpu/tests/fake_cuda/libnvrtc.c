/*
 * A fake NVRTC for tests/cuda_fake_driver.rs: it exports the functions cudarc calls and fails to
 * create any program, counting its calls. Built with the soname libnvrtc.so.12 or .13.
 */
typedef int nvrtcResult;
typedef void *nvrtcProgram;

static long calls;

long fake_nvrtc_calls(void) { return __atomic_load_n(&calls, __ATOMIC_SEQ_CST); }

#define COUNT() __atomic_fetch_add(&calls, 1, __ATOMIC_SEQ_CST)
enum { PROGRAM_CREATION_FAILURE = 2, INVALID_PROGRAM = 4 };

nvrtcResult nvrtcCreateProgram(nvrtcProgram *prog, const char *src, const char *name, int headers,
                               const char *const *sources, const char *const *names) {
    COUNT();
    (void)prog, (void)src, (void)name, (void)headers, (void)sources, (void)names;
    return PROGRAM_CREATION_FAILURE;
}

#define INVALID(name) nvrtcResult name(void) { COUNT(); return INVALID_PROGRAM; }
INVALID(nvrtcCompileProgram)
INVALID(nvrtcGetProgramLogSize)
INVALID(nvrtcGetProgramLog)
INVALID(nvrtcGetPTXSize)
INVALID(nvrtcGetPTX)
INVALID(nvrtcDestroyProgram)
