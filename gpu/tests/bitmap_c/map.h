/* Maps the POSIX shared-memory segment NAME whole, read-write; 0 if it cannot. */
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static unsigned char *map_segment(const char *name) {
    struct stat st;
    unsigned char *base;
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) return 0;
    base = fstat(fd, &st) != 0 ? MAP_FAILED : mmap(0, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return base == MAP_FAILED ? 0 : base;
}
