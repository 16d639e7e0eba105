#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <unistd.h>
#include <time.h>
#include <linux/falloc.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int c,char**v){ long chunk=atol(v[2]); int fd=open(v[1],O_RDWR); off_t sz=lseek(fd,0,SEEK_END);
 double t0=now(), mx=0; long n=0;
 for(off_t o=0;o<sz;o+=chunk){ double a=now(); if(fallocate(fd,FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE,o,chunk)) perror("f"); double d=now()-a; if(d>mx)mx=d; n++;}
 printf("chunk %ld: %ld calls %.1f ms total, max %.2f ms\n",chunk,n,(now()-t0)*1e3,mx*1e3);}
